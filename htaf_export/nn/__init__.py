"""Layers for HTAF-trained binary networks."""

from .binary import BinaryConv2d, BinaryLinear
from .htaf import HTAF, LEVELS, MODES, TIES, Step, exact_step, htaf_derivative, htaf_function
from .spiking import LIF

__all__ = [
    "HTAF", "Step", "BinaryConv2d", "BinaryLinear", "LIF",
    "exact_step", "htaf_function", "htaf_derivative", "LEVELS", "MODES", "TIES",
]
