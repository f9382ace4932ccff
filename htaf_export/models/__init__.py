"""Registered reference architectures of the four families."""

from . import bnn, dhn, icbm, resnet, snn  # noqa: F401  (registers the architectures)
from .registry import ReferenceModel, UnknownArchitecture, architectures, build, register

__all__ = ["ReferenceModel", "UnknownArchitecture", "architectures", "build", "register"]
