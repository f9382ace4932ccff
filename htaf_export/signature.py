"""What a model's ``forward`` takes: the names of its tensor arguments, and their per-sample shapes."""

from __future__ import annotations

import inspect
from collections import abc
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import BadInput


def forward_arguments(module: nn.Module) -> list[str]:
    """Names of the tensors ``module.forward`` takes (its positional parameters without defaults)."""
    if isinstance(module, torch.jit.ScriptModule):
        try:
            return [a.name for a in module.forward.schema.arguments[1:] if not a.has_default_value()]
        except (AttributeError, RuntimeError):
            return ["input"]
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ["input"]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.default is p.empty]
    return names or ["input"]


def as_shapes(value: Sequence[int] | Sequence[Sequence[int]] | None) -> list[list[int]] | None:
    """One shape ([1, 8, 8]) or one per input ([[1, 8, 8], [4]]) as a list of shapes."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer, str, bytes)) or not isinstance(value, (abc.Sequence, np.ndarray)):
        raise BadInput(f"input_shape must be a sequence of ints per sample, e.g. (1, 8, 8), or one per input; "
                       f"got {value!r}")
    items = list(value)
    if items and all(isinstance(d, (int, np.integer)) for d in items):
        return [[int(d) for d in items]]
    return [[int(d) for d in shape] for shape in items]
