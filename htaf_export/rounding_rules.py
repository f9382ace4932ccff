"""The rounding rule of each operation, for ``htaf_export.bounds`` (whose docstring states them and why; the
value type and the constants are in ``bounded``):
a ``Bounded`` value in, a ``Bounded`` value out."""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .bounded import ETA, LAMBDA, U, Bounded, NoBound, gamma, integers, is_integral, largest, value_and_error, value_of
from .rounding_activations import ACTIVATION_RULES
from .rounding_decisions import DECISION_RULES
from .rounding_norms import layer_norm, log_softmax, softmax

aten = torch.ops.aten


def _underflow(value: torch.Tensor, *errors: torch.Tensor) -> torch.Tensor:
    """ETA where a result may have underflowed: exact integers never do."""
    inexact = value != torch.round(value)
    for e in errors:
        inexact = inexact | (e != 0)
    return ETA * inexact


def _exact_sum(x: Bounded, weight: Any, b: torch.Tensor | None, value: torch.Tensor) -> Bounded | None:
    """An integer layer on integer inputs (a binary layer): every partial sum is an integer below 2²⁴,
    so every summation order gives the same float32 value. Bounded without a second convolution:
    |partial sum| ≤ max|x| · max over outputs of Σ|w| + max|b|."""
    if not (x.integer and isinstance(weight, Bounded) and weight.integer and (b is None or is_integral(b))):
        return None
    w = weight.value
    row_sum = weight.once("row_sum", lambda: float(w.abs().reshape(len(w), -1).sum(1).max()))
    top = x.largest if x.largest is not None else largest(x.value)
    top_sum = top * row_sum + (largest(b) if b is not None else 0.0)
    return Bounded.exact(value) if top_sum < 2.0 ** 24 else None


def _dot(x: Bounded, weight: Any, b: torch.Tensor | None, op: Callable, n: int, bias_last: bool = False) -> Bounded:
    """A linear layer (``op`` = linear or conv with its geometry): value, propagated and rounding error.
    A computed weight (a scaled sign written as a straight-through expression) brings its own error.
    ``bias_last``: the bias lies on the last axis (a linear layer at each position of [N, L, F]), not on axis 1."""
    w, w_error = value_and_error(weight)
    value = op(x.value, w, b)
    exact = _exact_sum(x, weight, b, value)
    if exact is not None:
        return exact
    once = weight.once if isinstance(weight, Bounded) else (lambda _, make: make())
    aw = once("abs", w.abs)
    # errors coming in: worst case Σ|w|·e, and (independent roundings, as in γ) λ·√(Σ w²·e²)
    top = largest(x.error)  # scaled, so that squares of small errors do not underflow
    w2 = once("square", lambda: w * w)
    carried = torch.minimum(op(x.error, aw, None), LAMBDA * top * torch.sqrt(op((x.error / top) ** 2, w2, None))) \
        if top > 0 else torch.zeros_like(value)
    magnitude = op(x.value.abs() + x.error, aw, None)
    if b is not None:
        magnitude = magnitude + (b.abs() if bias_last else _broadcast_bias(b.abs(), value))
    exact_weight = once("exact", lambda: bool(torch.all(w_error == 0)))
    if not exact_weight:
        carried = carried + op(x.value.abs() + x.error, w_error, None)
    exact = exact_weight and once("integral", lambda: is_integral(w)) and \
        bool(torch.all(x.error == 0)) and is_integral(x.value) and (b is None or is_integral(b)) and \
        largest(magnitude) < 2.0 ** 24
    rounding = torch.zeros_like(value) if exact else \
        gamma(n + 1) * magnitude + (n + 1) * (1 + once("largest", lambda: largest(w))) * ETA
    return Bounded(value, carried + rounding)


def _broadcast_bias(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return b.reshape(1, -1, *([1] * (like.dim() - 2))) if like.dim() > 2 else b


def _linear(x: Bounded, w, b=None) -> Bounded:
    return _dot(x, w, value_of(b), F.linear, int(value_of(w).shape[-1]), bias_last=True)


def _matmul(x: Bounded, w) -> Bounded:
    """x @ w with a 2-D right operand (a classifier written as ``h @ W.t()``): the linear layer of wᵀ; two computed
    operands (attention's q @ kᵀ, attn @ v): |a|·e_c + e_a·|c| + 3·e_a·e_c carried (two evaluations each within e), and the n-term sums' rounding."""
    if isinstance(x, Bounded) and isinstance(w, Bounded) and w.value.dim() > 2:
        n = int(x.value.shape[-1])
        a, c = x.value.abs() + x.error, w.value.abs() + w.error
        carried = x.value.abs() @ w.error + x.error @ w.value.abs() + 3 * (x.error @ w.error)
        return Bounded(x.value @ w.value, carried + gamma(n + 1) * (a @ c) + (n + 1) * ETA)
    if not isinstance(x, Bounded) or value_of(w).dim() != 2:
        raise NoBound("matrix product with a batched or constant left operand")
    wt = Bounded(w.value.t(), w.error.t(), w.integer) if isinstance(w, Bounded) else value_of(w).t()
    return _linear(x, wt)


def _conv(x: Bounded, w, b=None, stride=1, padding=0, dilation=1, groups=1) -> Bounded:
    weight = value_of(w)
    op = (lambda a, k, c: F.conv2d(a, k, c, stride, padding, dilation, groups)) if weight.dim() == 4 else \
        (lambda a, k, c: F.conv1d(a, k, c, stride, padding, dilation, groups))
    return _dot(x, w, value_of(b), op, int(weight[0].numel()))


def _convolution(x: Bounded, w, b, stride, padding, dilation, transposed, output_padding, groups) -> Bounded:
    """The general convolution a traced TorchScript conv reads as (``aten::_convolution``)."""
    if transposed:
        raise NoBound("transposed convolution")
    return _conv(x, w, b, stride, padding, dilation, groups)


def _batch_norm(x: Bounded, weight, bias, mean, var, training, momentum, eps, *_) -> Bounded:
    w, b, m, v = (value_of(t) for t in (weight, bias, mean, var))
    s = (w if w is not None else torch.ones_like(m)) / torch.sqrt(v + eps)
    shift = b if b is not None else torch.zeros_like(m)
    s_, m_, t_ = (_broadcast_bias(t, x.value) for t in (s, m, shift))
    value = torch.addcmul(t_, x.value - m_, s_)
    # |s|·e + γ₆·(|s|·(|x| + e + |μ|) + |β|) + 4(1 + |s|)η, as |s|·((1 + γ₆)·e + γ₆·|x|) + (a per-channel
    # constant): four passes over the activation instead of a dozen (batch norms are most of a ResNet's passes)
    sa = s_.abs()
    per_channel = gamma(6) * (sa * m_.abs() + t_.abs()) + 4 * (1 + sa) * ETA
    inner = x.value.abs().mul_(gamma(6)) if x.integer else torch.add(x.error * (1 + gamma(6)), x.value.abs(),
                                                                        alpha=gamma(6))
    return Bounded(value, torch.addcmul(per_channel, sa, inner))


def _exact(value: torch.Tensor) -> Bounded | None:
    """An operation on exact integers whose result stays below 2²⁴: exact, whatever the order."""
    return Bounded.exact(value) if largest(value) < 2.0 ** 24 else None


def _rounded(value: torch.Tensor, carried: torch.Tensor, inputs: tuple[Any, ...]) -> Bounded:
    """One rounding of ``value`` on top of the ``carried`` error. η only where an underflow is possible: a
    result that is an exact integer computed from exact values never underflows, which matters only where
    an input holds exact integers; elsewhere η everywhere (cheaper than finding the few exact elements)."""
    if any(isinstance(a, Bounded) and a.integer for a in inputs):
        return Bounded(value, torch.add(carried, value.abs(), alpha=U).add_(_underflow(value, carried)))
    return Bounded(value, torch.add(carried, value.abs(), alpha=U).add_(ETA))


def _add(a, b, alpha=1) -> Bounded:
    av, ae, bv, be = value_and_error(a) + value_and_error(b)
    value = torch.add(av, bv, alpha=alpha)
    if integers(a, b, alpha):
        exact = _exact(value)
        if exact is not None:
            return exact
    return _rounded(value, torch.add(ae, be, alpha=abs(alpha)), (a, b))


def _sub(a, b, alpha=1) -> Bounded:
    return _add(a, b, -alpha)


def _mul(a, b) -> Bounded:
    av, ae, bv, be = value_and_error(a) + value_and_error(b)
    value = av * bv
    if integers(a, b):
        exact = _exact(value)
        if exact is not None:
            return exact
    return _rounded(value, av.abs() * be + bv.abs() * ae + ae * be, (a, b))


def _div(a, b) -> Bounded:
    av, ae, bv, be = value_and_error(a) + value_and_error(b)
    if bool(torch.any(be != 0)):
        raise NoBound("division by a computed tensor")
    value = av / bv
    return Bounded(value, ae / bv.abs() + U * value.abs() + ETA)


def _averaged(op: Callable, x: Bounded, k: int, *args) -> Bounded:
    """A mean over ``k`` elements (pooling, mean): linear in x, one rounded sum of k terms and a division."""
    value = op(x.value, *args)
    return Bounded(value, op(x.error, *args) + gamma(k + 1) * op(x.value.abs() + x.error, *args) + (k + 1) * ETA)


def _avg_pool(op) -> Callable:
    def rule(x: Bounded, kernel, *args) -> Bounded:
        k = math.prod(kernel) if isinstance(kernel, (list, tuple)) else int(kernel) ** (x.value.dim() - 2)
        return _averaged(lambda t, *a: op(t, kernel, *a), x, int(k), *args)
    return rule


def _adaptive_avg_pool(op) -> Callable:
    # Each window holds at most the whole input plane: the largest sum, the largest γ.
    def rule(x: Bounded, size) -> Bounded:
        return _averaged(op, x, int(math.prod(x.value.shape[2:])), size)
    return rule


def _mean(x: Bounded, dims, keepdim=False, dtype=None) -> Bounded:
    k = math.prod(x.value.shape[d] for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
    return _averaged(lambda t, d, kd: aten.mean.dim(t, d, kd), x, int(k), dims, keepdim)


def _padded_integer(x: Bounded, value) -> bool:
    return x.integer and float(value or 0.0).is_integer() and abs(float(value or 0.0)) < 2.0 ** 24


def _padded(x: Bounded, value: torch.Tensor, error: Callable[[], torch.Tensor], fill) -> Bounded:
    if not _padded_integer(x, fill):
        return Bounded(value, error())
    top = max(x.largest, abs(float(fill or 0.0))) if x.largest is not None else None
    return Bounded.exact(value, top)


def _pad(x: Bounded, pad, mode="constant", value=None) -> Bounded:
    if mode in ("reflect", "replicate", "circular"):  # copies of the input's own elements, with their errors
        padded = aten.pad.default(x.value, pad, mode)
        if x.integer:
            return Bounded.exact(padded, x.largest)
        return Bounded(padded, aten.pad.default(x.error.expand_as(x.value).contiguous(), pad, mode))
    if mode != "constant":
        raise NoBound(f"{mode} padding")
    return _padded(x, aten.pad.default(x.value, pad, mode, value), lambda: aten.pad.default(x.error, pad, mode, 0.0),
                   value)


def _constant_pad(x: Bounded, pad, value=0.0) -> Bounded:
    return _padded(x, aten.constant_pad_nd.default(x.value, pad, value),
                   lambda: aten.constant_pad_nd.default(x.error, pad, 0.0), value)


def _smooth(fn: Callable, lipschitz: float) -> Callable:
    def rule(x: Bounded) -> Bounded:
        value = fn(x.value)
        return Bounded(value, lipschitz * x.error + gamma(4) * value.abs() + ETA)
    return rule


def _same(fn: Callable) -> Callable:
    """An op that moves or picks elements (views, concatenation, max, ReLU): the same op on the error
    (for max and ReLU, |max(a) − max(b)| ≤ max|a − b|)."""
    def rule(*args, **kwargs):
        values = pytree.tree_map(lambda a: a.value if isinstance(a, Bounded) else a, (args, kwargs),
                                 is_leaf=lambda a: isinstance(a, Bounded))
        errors = pytree.tree_map(lambda a: a.error if isinstance(a, Bounded) else a, (args, kwargs),
                                 is_leaf=lambda a: isinstance(a, Bounded))
        bounded = [a for a in pytree.tree_leaves((args, kwargs), is_leaf=lambda a: isinstance(a, Bounded))
                   if isinstance(a, Bounded)]
        # clamping to a fractional limit leaves integers: the only ops here that may not keep them (or |x|'s bound)
        integer = fn not in (aten.hardtanh.default, aten.clamp.default) and all(a.integer for a in bounded)
        value = fn(*values[0], **values[1])
        if integer and bounded and isinstance(value, torch.Tensor):  # exact in, exact out: no pass over zeros
            tops = [a.largest for a in bounded]
            return Bounded.exact(value, max(tops) if None not in tops else None)
        return Bounded(value, fn(*errors[0], **errors[1]), integer)
    return rule


def _bilinear(x: Bounded, output_size, align_corners, scale_factors) -> Bounded:
    """Bilinear resizing: each output a convex combination of the 2×2 input pixels around its source point, so
    the incoming errors pass through the same resizing. Implementations place that point from their own float
    coordinates, (dst + ½)·in/out − ½ or dst·(in − 1)/(out − 1): each axis's weight differs by at most
    Λ = 4u·(size + 1), and Σ|δ(h·w)| ≤ 2Λ + 2Λ over the four, times the largest |x| nearby (a 3×3 max, which
    holds every 2×2 block around the point); the products and sums round by γ₈ of the same."""
    op = lambda t: aten.upsample_bilinear2d.vec(t, output_size, align_corners, scale_factors)  # noqa: E731
    lam = 4 * U * (max(x.value.shape[-2:]) + 1)
    near = F.max_pool2d(x.value.abs() + x.error, 3, stride=1, padding=1)
    return Bounded(op(x.value), op(x.error) + (4 * lam + gamma(8)) * op(near) + ETA)


def _sum(x: Bounded, dims, keepdim=False, dtype=None) -> Bounded:
    """A sum over k elements (``torch.stack(steps).sum(0)``): the errors summed, and one rounded k-term sum."""
    k = math.prod(x.value.shape[d] for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
    total = lambda t: aten.sum.dim_IntList(t, dims, keepdim)  # noqa: E731
    if x.integer:
        exact = _exact(total(x.value))
        if exact is not None:
            return exact
    return Bounded(total(x.value), total(x.error) + gamma(int(k)) * total(x.value.abs() + x.error) + k * ETA)


def _unbind(x: Bounded, dim: int = 0) -> list[Bounded]:
    """``for x_t in x``: each slice with its own error."""
    return [Bounded(v, e, x.integer) for v, e in zip(x.value.unbind(dim), x.error.unbind(dim))]


def _mean_all(x: Bounded, dtype=None) -> Bounded:
    """The mean of every element (a per-layer XNOR scale, |w|.mean()): one rounded sum and a division."""
    if not isinstance(x, Bounded):
        return aten.mean.default(value_of(x))
    return _averaged(lambda t: aten.mean.default(t), x, int(x.value.numel()))


def _adaptive_max_pool(op: Callable) -> Callable:
    """(values, indices): the same pooling on the error (|max a − max b| ≤ max |a − b| over each window)."""
    def rule(x: Bounded, size) -> tuple[Bounded, torch.Tensor]:
        values, indices = op(x.value, size)
        return Bounded(values, op(x.error, size)[0], x.integer), indices
    return rule


def _dropout(x: Bounded, p: float, train: bool) -> Bounded:
    if train:
        raise NoBound("dropout in training mode")
    return x  # eval: the identity


def _leaky_relu(x: Bounded, slope: float = 0.01) -> Bounded:
    """Lipschitz max(1, |slope|); one rounded product on the negative side (it may underflow)."""
    value = F.leaky_relu(x.value, slope)
    return Bounded(value, max(1.0, abs(slope)) * x.error + U * value.abs() + ETA)


def _to(x, *args, **kwargs):
    value = x.value if isinstance(x, Bounded) else x
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        value = value.float()
    return Bounded(value.float(), x.error if isinstance(x, Bounded) else torch.zeros_like(value, dtype=torch.float32))


def _filled(fn: Callable) -> Callable:
    """ones_like, zeros_like, full_like: a constant of another tensor's shape, exact."""
    def rule(like, *args, **kwargs) -> Bounded:
        value = fn(value_of(like), *args, **kwargs).float()
        return Bounded(value, torch.zeros_like(value), is_integral(value))
    return rule


RULES: dict[Any, Callable] = {
    **ACTIVATION_RULES, **DECISION_RULES,
    aten.linear.default: _linear, aten.mm.default: _matmul, aten.matmul.default: _matmul, aten.bmm.default: _matmul,
    aten.conv2d.default: _conv, aten.conv1d.default: _conv, aten.convolution.default: _convolution,
    aten.batch_norm.default: _batch_norm, aten.layer_norm.default: layer_norm,
    aten._native_batch_norm_legit_no_training.default: lambda x, w, b, m, v, mom, eps: (
        _batch_norm(x, w, b, m, v, False, mom, eps), None, None),
    aten.add.Tensor: _add, aten.sub.Tensor: _sub, aten.mul.Tensor: _mul, aten.div.Tensor: _div,
    aten.rsub.Scalar: lambda x, c, alpha=1: _add(c, x, -alpha),  # c − α·x (a LIF's 1 − spike)
    aten.avg_pool2d.default: _avg_pool(aten.avg_pool2d.default),
    aten.avg_pool1d.default: _avg_pool(aten.avg_pool1d.default),
    aten.adaptive_avg_pool2d.default: _adaptive_avg_pool(aten.adaptive_avg_pool2d.default),
    aten.adaptive_avg_pool1d.default: _adaptive_avg_pool(aten.adaptive_avg_pool1d.default),
    aten.mean.dim: _mean, aten.mean.default: _mean_all, aten.sum.dim_IntList: _sum, aten.unbind.int: _unbind,
    aten.pad.default: _pad, aten.constant_pad_nd.default: _constant_pad,
    aten.sigmoid.default: _smooth(torch.sigmoid, 0.25), aten.tanh.default: _smooth(torch.tanh, 1.0),
    aten.ones_like.default: _filled(aten.ones_like.default), aten.zeros_like.default: _filled(aten.zeros_like.default),
    aten.full_like.default: _filled(aten.full_like.default),
    aten.dropout.default: _dropout, aten.feature_dropout.default: _dropout, aten.alpha_dropout.default: _dropout,
    aten.feature_alpha_dropout.default: _dropout, aten.leaky_relu.default: _leaky_relu,
    aten.upsample_bilinear2d.vec: _bilinear, aten.log_softmax.int: log_softmax, aten.softmax.int: softmax, aten._softmax.default: lambda x, d, h: softmax(x, d), aten._log_softmax.default: lambda x, dim, half: log_softmax(x, dim),
    aten.adaptive_max_pool2d.default: _adaptive_max_pool(aten.adaptive_max_pool2d.default),
    aten.adaptive_max_pool1d.default: _adaptive_max_pool(aten.adaptive_max_pool1d.default),
    operator.getitem: lambda items, i: items[i],  # one result of a multi-result op (values, indices)
    aten.to.dtype: _to, aten._to_copy.default: _to,
    **{op: _same(op) for op in (
        aten.relu.default, aten.max_pool2d.default, aten.max_pool1d.default, aten.flatten.using_ints,
        aten.view.default, aten.reshape.default, aten.permute.default, aten.transpose.int, aten.t.default,
        aten.unsqueeze.default, aten.squeeze.dim, aten.cat.default, aten.clone.default, aten.contiguous.default,
        aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default, aten.expand.default,
        aten.expand_as.default, aten.select.int, aten.slice.Tensor, aten.hardtanh.default, aten.clamp.default,
        aten.neg.default, aten.alias.default, aten.abs.default, aten.movedim.int, aten.stack.default,
        aten.pixel_shuffle.default, aten.flip.default, aten.roll.default, aten.unflatten.int)},
}
