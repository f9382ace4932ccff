"""Rounding rules for decisions (``htaf_export.bounds`` states the rules and why): comparisons outside a Step,
their logical combinations, ``where`` on them, and ``torch.sign``. A decision another correct evaluation could
make the other way carries a bound of 1 there."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .bounded import Bounded, integers, value_and_error, value_of

aten = torch.ops.aten


def _where(cond, a, b) -> Bounded:
    c = value_of(cond)
    av, ae, bv, be = value_and_error(a) + value_and_error(b)
    value = torch.where(c, av, bv)
    if isinstance(cond, Bounded):  # an uncertain decision may pick the other side
        return Bounded(value, torch.where(c, ae, be) + cond.error * ((av - bv).abs() + ae + be))
    if integers(a, b):  # a sign written as where(w >= 0, 1, -1): exact integers
        return Bounded.exact(value)
    return Bounded(value, torch.where(c, ae, be))


def _sign(x: Bounded) -> Bounded:
    """``torch.sign`` (three values, so not a step): exact where the input's bound keeps it off zero; within the
    bound of zero another evaluation may give any of −1, 0, 1, so 2 there."""
    value = torch.sign(x.value)
    uncertain = x.value.abs() <= x.error
    if not bool(uncertain.any()):
        return Bounded.exact(value, 1.0)
    return Bounded(value, uncertain.to(value.dtype) * 2)


def _compare(fn: Callable) -> Callable:
    """A comparison outside a Step (two computed tensors, or a decision the model returns): the reference's
    decision, exact where the operands' bounds keep them apart; within them another correct evaluation may
    decide the other way, so the decision's bound is 1 there (a bool kept as such: ``where`` reads it)."""
    def rule(a, b) -> torch.Tensor | Bounded:
        (av, ae), (bv, be) = value_and_error(a), value_and_error(b)
        value = fn(value_of(a), value_of(b))
        reach = ae + be
        uncertain = ((av - bv).abs() <= reach) & (reach > 0)
        if not bool(uncertain.any()):
            return value
        return Bounded(value, uncertain.to(torch.float32))
    return rule


def _logical(fn: Callable) -> Callable:
    """and, or, xor, not of decisions: uncertain wherever one of the decisions read is."""
    def rule(*args) -> torch.Tensor | Bounded:
        value = fn(*(value_of(a) for a in args))
        errors = [a.error for a in args if isinstance(a, Bounded)]
        if not errors:
            return value
        return Bounded(value, torch.stack(torch.broadcast_tensors(*errors)).amax(0).expand(value.shape))
    return rule


DECISION_RULES: dict[Any, Callable] = {
    aten.where.self: _where, aten.sign.default: _sign,
    **{getattr(aten, name).Scalar: _compare(getattr(torch, name)) for name in ("ge", "gt", "le", "lt", "eq", "ne")},
    **{getattr(aten, name).Tensor: _compare(getattr(torch, name)) for name in ("ge", "gt", "le", "lt", "eq", "ne")},
    **{getattr(aten, name).default: _logical(getattr(torch, name))
       for name in ("logical_and", "logical_or", "logical_xor", "logical_not")},
    **{getattr(aten, name).Tensor: _logical(getattr(torch, name))
       for name in ("bitwise_and", "bitwise_or", "bitwise_xor")},
    aten.bitwise_not.default: _logical(torch.bitwise_not), aten.__and__.Tensor: _logical(torch.bitwise_and),
    aten.__or__.Tensor: _logical(torch.bitwise_or), aten.__xor__.Tensor: _logical(torch.bitwise_xor),
}
