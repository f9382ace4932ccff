"""Rounding rules for smooth activations (GELU, ELU, SELU, CELU, softplus, hard sigmoid/swish, mish, SiLU).

A runtime computes these with its own formula (TFLite's GELU kernel, ``α·(exp(x) − 1)`` where PyTorch calls
``expm1``, erf against erfc), each a few roundings of intermediates no larger than |x| + 1 away from the exact
function. So two correct evaluations differ by at most L·e (the input's error e through the function's
Lipschitz constant L) plus γ₈·(|f(x)| + |x| + 1): relative to the larger of the result and the input, with an
absolute part for the cancellations near zero (exp(x) − 1, 1 + erf(x))."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .bounded import Bounded, gamma

aten = torch.ops.aten


def _rule(op: Any, lipschitz: Callable[..., float], scale: Callable[..., float] = lambda *a, **k: 1.0
          ) -> Callable[..., Bounded]:
    """``scale``: the size of the intermediates near 0 (α·(exp(x) − 1) for ELU: α)."""
    def rule(x: Bounded, *args: Any, **kwargs: Any) -> Bounded:
        value = op(x.value, *args, **kwargs)
        spread = gamma(8) * (value.abs() + x.value.abs() + max(1.0, scale(*args, **kwargs)))
        return Bounded(value, lipschitz(*args, **kwargs) * x.error + spread)
    return rule


def _elu_slope(alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> float:
    return abs(scale) * max(1.0, abs(alpha * input_scale))


def _softplus_slope(beta: float = 1.0, threshold: float = 20.0) -> float:
    return 1.0


SELU_SLOPE = 1.0507009873554805 * 1.6732632423543772

ACTIVATION_RULES: dict[Any, Callable[..., Bounded]] = {
    aten.gelu.default: _rule(aten.gelu.default, lambda *a, **k: 1.13),  # max of Φ(x) + x·φ(x)
    aten.elu.default: _rule(aten.elu.default, _elu_slope, _elu_slope),
    aten.celu.default: _rule(aten.celu.default, lambda *a, **k: 1.0, lambda alpha=1.0: abs(alpha)),
    aten.selu.default: _rule(aten.selu.default, lambda: SELU_SLOPE, lambda: SELU_SLOPE),
    aten.softplus.default: _rule(aten.softplus.default, _softplus_slope),
    aten.hardsigmoid.default: _rule(aten.hardsigmoid.default, lambda: 1.0 / 6.0),
    aten.hardswish.default: _rule(aten.hardswish.default, lambda: 1.5),
    aten.mish.default: _rule(aten.mish.default, lambda: 1.09),
    aten.silu.default: _rule(aten.silu.default, lambda: 1.1),
}
