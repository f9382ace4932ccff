"""Fold a batch norm that feeds a step into the step's per-channel threshold, keeping the tie exact.

For one channel, with y = γ·(x − μ)/σ + b and σ = √(var + ε):

    γ > 0:   y ≥ θ  ⇔   x ≥ μ + (θ − b)·σ/γ = t
    γ < 0:   y ≥ θ  ⇔  −x ≥ −t                      (the comparison flips: multiply x by −1)
    γ = 0:   y = b, a constant: 0·x compared with a threshold chosen to give b's answer

so the step becomes step(s·x, s·t) with s = sign(γ) ∈ {−1, 0, +1}. Multiplying by ±1 is exact in
floating point and both sides keep ``≥`` (or ``>``), so the tie rule is preserved at the threshold.
The folded threshold is rounded once to float32; the reference rounds inside its own batch norm,
so the two can only disagree where the reference pre-activation is within rounding of θ.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from ..ops import HTAF_DOMAIN, HTAF_OPSET_VERSION, STEP_OPS
from .base import PassReport, apply_rules, report
from .util import const_array, unique_initializer_name


def folded_threshold(params: list[np.ndarray], theta: float, eps: float, tie: str) -> tuple[np.ndarray, np.ndarray]:
    """(direction s, threshold s·t) per channel for batch-norm ``params`` (γ, b, μ, var) followed by a step at θ."""
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    sigma = np.sqrt(var.astype(np.float32) + np.float32(eps)).astype(np.float64)
    s = np.sign(gamma)
    safe = np.where(gamma == 0, 1.0, gamma)
    t = mean + (theta - beta) * sigma / safe
    # γ = 0: the output is b everywhere; 0·x = 0 then fires exactly when b's comparison with θ does.
    ge = tie == "ge"
    fires = beta >= theta if ge else beta > theta
    constant_t = np.where(fires, 0.0 if ge else -1.0, 1.0 if ge else 0.0)
    return s, np.where(gamma == 0, constant_t, s * t)


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
        out = getattr(op, self.op)(source, t_value, tie=tie.as_string(), _domain=HTAF_DOMAIN,
                                   _version=HTAF_OPSET_VERSION)
        out.producer().name = step.name
        out.metadata_props.update(stepped.metadata_props)  # the step's output keeps what the exporter said of it
        return out


RULES = [FoldBatchNorm.rule(op) for op in STEP_OPS]


class FoldBatchNormIntoSteps(ir.passes.InPlacePass):
    """Fold every BatchNormalization whose only consumer is a step; refusals say why one stayed."""

    def call(self, model: ir.Model) -> PassReport:
        count, refusals = apply_rules(model, RULES, shared="the batch norm's output is used by more than its step")
        return report(model, modified=bool(count), refusals=refusals)
