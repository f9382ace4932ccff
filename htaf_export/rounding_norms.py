"""The rounding rules of layer normalization, softmax and log-softmax (``bounds`` states the rules;
``rounding_rules`` holds the others).

y = (x − μ)·r·w + b with r = (σ² + ε)^−½ over the last axes. What comes in (error e on x) moves x̂ = (x − μ)·r
by at most r·(eᵢ + mean e + |x̂ᵢ|·mean(|x̂|·e)) to first order (the derivative of x̂ with respect to x); the
rounding of μ and x − μ adds r·(γₙ·mean|x| + u·|x − μ|), and the variance, which runtimes compute in two passes
or as E[x²] − μ² (ONNX Runtime: one pass), is off by γₙ₊₃·(mean x² + μ²) absolutely, r by half that relative to
σ² + ε. A row nearly constant against its incoming error (the first order no longer holds) has no bound.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .bounded import ETA, SLACK, U, Bounded, NoBound, gamma

FIRST_ORDER = 0.1  # largest relative move of x̂ (r·(max e + mean e)) the first-order bound is used for


def layer_norm(x: Bounded, shape, weight=None, bias=None, eps: float = 1e-5, *_) -> Bounded:
    w, b = (t.value if isinstance(t, Bounded) else t for t in (weight, bias))
    dims = tuple(range(-len(shape), 0))
    n = math.prod(shape)
    v, e = x.value, x.error.expand(x.value.shape)
    mu = v.mean(dims, keepdim=True)
    d = v - mu
    var = (d * d).mean(dims, keepdim=True)
    r = torch.rsqrt(var + eps)
    xhat = d * r
    mean_e = e.mean(dims, keepdim=True)
    if float((r * (e.amax(dims, keepdim=True) + mean_e)).max()) > FIRST_ORDER:
        raise NoBound("layer norm of a row nearly constant against its rounding")
    ax = xhat.abs()
    carried = r * (e + mean_e + ax * (ax * e).mean(dims, keepdim=True))
    relative_r = 0.5 * gamma(n + 3) * ((v * v).mean(dims, keepdim=True) + mu * mu) / (var + eps) + 3 * U
    # the mean and x − μ of a row of tiny values are subnormal: a runtime that flushes them loses 2⁻¹²⁶ in each
    rounding = r * (gamma(n + 1) * v.abs().mean(dims, keepdim=True) + U * d.abs() + 2 * ETA) + ax * relative_r
    err = SLACK * (carried + rounding)
    value = F.layer_norm(v, list(shape), w, b, eps)
    aw = w.abs() if w is not None else torch.ones(())
    top = aw * ax + (b.abs() if b is not None else 0.0)
    return Bounded(value, aw * err + gamma(2) * top + ETA)


def log_softmax(x: Bounded, dim: int, *_) -> Bounded:
    """x − logsumexp(x): |Δ| ≤ 2·max|Δx| along dim (logsumexp is 1-Lipschitz in the max norm), plus the rounding of
    the exponentials, their n-term sum, its log (an absolute error: the + 1) and the subtraction."""
    if not isinstance(x, Bounded):
        return torch.log_softmax(x, dim)
    value = torch.log_softmax(x.value, dim)
    carried = 2 * x.error.amax(dim=dim, keepdim=True) if x.error.dim() else 2 * x.error
    lse, n = (x.value - value).abs(), x.value.shape[dim] if x.value.dim() else 1
    return Bounded(value, carried + gamma(n + 4) * (x.value.abs() + lse + 1) + ETA)


def softmax(x: Bounded, dim: int, *_) -> Bounded:
    """exp(x − max) / Σ: log y moves by at most 2·max|Δx| along dim, so |Δy| ≤ y·(e^{2·max e} − 1); the rounded
    x − max adds y·u·|x − max|, the exponentials, the n-term sum and the division y·γₙ₊₄."""
    value = torch.softmax(x.value, dim)
    spread = torch.expm1(2 * x.error.amax(dim=dim, keepdim=True)) if x.error.dim() else torch.expm1(2 * x.error)
    shift = U * (x.value.amax(dim=dim, keepdim=True) - x.value) if x.value.dim() else 0.0  # x − max, rounded
    return Bounded(value, value * (spread + shift + gamma(int(x.value.shape[dim]) + 4)) + ETA)
