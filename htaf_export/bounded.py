"""The value the rounding analysis carries (``Bounded``: a float32 tensor and its error bound) and the
constants of float32 rounding it is built on (``htaf_export.bounds`` states the rules and why)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

U = 2.0 ** -24
# Below 2⁻¹²⁶ a float32 result is subnormal, or zero where a runtime flushes subnormals (FTZ/DAZ):
# each rounded operation may then lose this much absolutely, whatever its relative bound says.
ETA = 2.0 ** -126
# The bounds are computed in float32 (float64 convolutions are 7x slower on CPUs): sums of non-negative
# terms, each off by at most γₙ relative, through a few dozen layers; 5 % covers that with room.
SLACK = 1.05


LAMBDA = 7.0  # Higham–Mary: the probabilistic bound fails with probability below 2n·exp(−λ²/2) ≈ n·5e-11


def gamma(n: int) -> float:
    """Relative rounding bound of a sum of n terms: worst case n·u for a few terms, Higham and Mary's
    probabilistic λ·√n·u for long sums (rounding errors that all add up in the worst direction never
    happen on real data; the worst case would explain away real defects in deep float paths)."""
    worst = n * U / (1 - n * U)
    return worst if n <= 16 else min(worst, math.expm1(LAMBDA * math.sqrt(n) * U + n * U * U / (1 - U)))


class NoBound(Exception):
    """The model uses an operation this analysis has no rule for."""


@dataclass
class Bounded:
    """A tensor's float32 value and the bound on any float32 evaluation's distance from the exact value
    (|value| + error bounds the exact value's magnitude, which is what the rules use)."""

    value: torch.Tensor
    error: torch.Tensor
    # True when the value is known to hold exact integers (below 2²⁴) with no error: step outputs, ±1 weights,
    # binary layers' sums. Lets a binary layer skip its magnitude convolution and integrality checks.
    integer: bool = False
    largest: float | None = None  # a known bound on max |value| (a step's outputs: 1), saving a pass to find it
    # what a rule derived from a constant (a weight's |w|, w²): the same object serves every chunk
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def exact(cls, value: torch.Tensor, largest: float | None = None) -> "Bounded":
        """A tensor of exact integers: no error (one broadcast zero: no memory, no pass to fill it)."""
        return cls(value, no_error(value), True, largest)

    def once(self, what: str, make: Callable[[], Any]) -> Any:
        if what not in self.derived:
            self.derived[what] = make()
        return self.derived[what]


def no_error(value: torch.Tensor) -> torch.Tensor:
    """The error of an exact tensor: one zero broadcast to its shape (no memory, no pass to fill it)."""
    return torch.zeros((), dtype=torch.float32).expand(value.shape)


def largest(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def is_integral(t: torch.Tensor) -> bool:
    return bool(torch.all(t == torch.round(t))) and largest(t) < 2.0 ** 24


def integers(*args: Any) -> bool:
    return all(a.integer if isinstance(a, Bounded) else is_integral(torch.as_tensor(a, dtype=torch.float32))
               for a in args)


def value_of(t: Any) -> Any:
    if isinstance(t, Bounded):
        return t.value
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def value_and_error(t: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(t, Bounded):  # a decision (bool) reads as 0 and 1
        return (t.value.float() if t.value.dtype == torch.bool else t.value), t.error
    value = torch.as_tensor(t, dtype=torch.float32)
    return value, torch.zeros_like(value)
