"""Fold a batch norm that feeds a step into the step's per-channel threshold, keeping the tie exact.

For one channel, with y = γ·(x − μ)/σ + b and σ = √(var + ε):

    γ > 0:   y ≥ θ  ⇔   x ≥ μ + (θ − b)·σ/γ = t
    γ < 0:   y ≥ θ  ⇔  −x ≥ −t                      (the comparison flips: multiply x by −1)
    γ = 0:   y = b, a constant: 0·x compared with a threshold chosen to give b's answer

so the step becomes step(s·x, s·t) with s = sign(γ) ∈ {−1, 0, +1}. Multiplying by ±1 is exact in
floating point and both sides keep ``≥`` (or ``>``), so the tie rule is preserved at the threshold.
The threshold is not rounded from that formula: it is found by bisection over the float32 numbers against
PyTorch's own batch norm (monotone in x), so the folded step fires on exactly the same float32 inputs as the
reference's batch norm + step (``folded_threshold``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from ..ops import HTAF_DOMAIN, HTAF_OPSET_VERSION, STEP_OPS
from .base import PassReport, apply_rules, report
from .util import const_array, unique_initializer_name


def _keys(x: np.ndarray) -> np.ndarray:
    """float32 → int64 keys in the floats' order (−0 just below +0); the map is its own inverse on int32 bits."""
    bits = x.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def _floats(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys < 0, -(keys + 1) | -0x80000000, keys).astype(np.int64)
    return (bits & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def folded_threshold(params: list[np.ndarray], theta: float, eps: float, tie: str) -> tuple[np.ndarray, np.ndarray]:
    """(direction s, threshold) per channel such that step(s·x, threshold) under ``tie`` fires exactly where the
    reference's own float32 batch norm followed by the step at θ does, for every float32 x.

    A float32 batch norm is a monotone function of x in each channel (each rounded operation is), so the x that
    fire form a half-line; bisection over the floats, evaluating PyTorch's batch norm itself, finds its end."""
    import torch
    import torch.nn.functional as F

    gamma, beta, mean, var = (torch.tensor(np.asarray(p, dtype=np.float32).reshape(-1)) for p in params)
    threshold = np.float32(theta)

    def fires(x: np.ndarray) -> np.ndarray:
        y = F.batch_norm(torch.from_numpy(x.astype(np.float32)[None, :]), mean, var, gamma, beta, False, 0.0, eps)
        y = y[0].numpy()
        return y >= threshold if tie == "ge" else y > threshold

    s = np.sign(gamma.numpy()).astype(np.float32)
    up = s >= 0  # firing set {x ≥ a} (γ ≥ 0) or {x ≤ a} (γ < 0)
    lo, hi = np.full(s.shape, _keys(np.float32([-np.inf]))[0]), np.full(s.shape, _keys(np.float32([np.inf]))[0])
    # invariant: for γ > 0, lo does not fire and hi fires; for γ < 0, lo fires and hi does not
    at_lo, at_hi = fires(_floats(lo)), fires(_floats(hi))
    for _ in range(34):
        mid = (lo + hi) // 2
        on = fires(_floats(mid))
        go_up = np.where(up, ~on, on)
        lo, hi = np.where(go_up, mid, lo), np.where(go_up, hi, mid)
    edge = np.where(up, _floats(hi), _floats(lo))  # the first firing float (γ > 0), the last (γ < 0)
    edge = np.where(up & at_lo, np.float32(-np.inf), edge)
    edge = np.where(up & ~at_hi, np.float32(np.inf), edge)
    edge = np.where(~up & at_hi, np.float32(np.inf), edge)
    edge = np.where(~up & ~at_lo, np.float32(-np.inf), edge)
    # in terms of s·x: fires ⇔ s·x ≥ s·edge; a gt step needs the float just below
    t = np.where(up, edge, -edge).astype(np.float32)
    if tie == "gt":
        t = np.nextafter(t, np.float32(-np.inf)).astype(np.float32)
    zero = gamma.numpy() == 0
    if zero.any():  # γ = 0: the output is b everywhere; 0·x = 0 is compared with a threshold giving b's answer
        fired = fires(np.zeros(s.shape, np.float32))
        ge = tie == "ge"
        t = np.where(zero, np.where(fired, 0.0 if ge else -1.0, 1.0 if ge else 0.0), t).astype(np.float32)
        s = np.where(zero, 0.0, np.where(up, 1.0, -1.0)).astype(np.float32)
    else:
        s = np.where(up, 1.0, -1.0).astype(np.float32)
    return s, t


class FoldBatchNorm(RewriteRuleClassBase):
    """step(BatchNormalization(X, γ, b, μ, var), θ) → step(s·X, s·t)  (see the module docstring)."""

    def __init__(self, op: str) -> None:
        super().__init__(name=f"FoldBatchNorm[{op}]")
        self.op = op

    def pattern(self, op, x, gamma, beta, mean, var, theta, tie):
        y = op.BatchNormalization(x, gamma, beta, mean, var, _outputs=["normalized"])
        return getattr(op, self.op)(y, theta, tie=tie, _domain=HTAF_DOMAIN, _outputs=["stepped"])

    def check(self, context, x, gamma, beta, mean, var, theta, normalized, **_) -> MatchResult:
        result = MatchResult()
        if any(const_array(v) is None for v in (gamma, beta, mean, var)):
            return result.fail("batch-norm parameters are computed at run time", normalized)
        threshold = const_array(theta)
        if threshold is None or threshold.size != 1:
            return result.fail("the step threshold is not one constant", theta)
        if x.shape is None:
            return result.fail("the batch norm's input has no known rank", x)
        if any(o.uses() for o in normalized.producer().outputs[1:]):
            return result.fail("the batch norm's running statistics are used (training mode)", normalized)
        return result

    def rewrite(self, op, x, gamma, beta, mean, var, theta, tie, normalized, stepped, **_):
        bn, step = normalized.producer(), stepped.producer()
        graph = step.graph
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        params = [const_array(v) for v in (gamma, beta, mean, var)]
        s, threshold = folded_threshold(params, float(const_array(theta).reshape(())), eps,  # type: ignore[union-attr]
                                        tie.as_string())
        shape = (-1,) + (1,) * (len(x.shape) - 2)
        name = stepped.name or "step"
        t_value = op.initializer(ir.tensor(threshold.astype(np.float32).reshape(shape)),
                                 name=unique_initializer_name(graph, f"{name}.threshold"))
        source = x
        if not np.all(s == 1):
            s_value = op.initializer(ir.tensor(s.astype(np.float32).reshape(shape)),
                                     name=unique_initializer_name(graph, f"{name}.direction"))
            source = op.Mul(x, s_value)
            source.producer().name = f"{name}/direction"
            source.name = f"{name}.directed_input"
            source.shape, source.dtype = x.shape, x.dtype  # a per-channel sign keeps the shape (qonnx needs the rank)
        out = getattr(op, self.op)(source, t_value, tie=tie.as_string(), _domain=HTAF_DOMAIN,
                                   _version=HTAF_OPSET_VERSION)
        out.producer().name = step.name
        out.shape, out.dtype = stepped.shape, stepped.dtype
        out.metadata_props.update(stepped.metadata_props)  # the step's output keeps what the exporter said of it
        return out


RULES = [FoldBatchNorm.rule(op) for op in STEP_OPS]


class FoldBatchNormIntoSteps(ir.passes.InPlacePass):
    """Fold every BatchNormalization whose only consumer is a step; refusals say why one stayed."""

    def call(self, model: ir.Model) -> PassReport:
        count, refusals = apply_rules(model, RULES, shared="the batch norm's output is used by more than its step")
        return report(model, modified=bool(count), refusals=refusals)
