"""Recognise exact steps written with plain ops (as traced TorchScript or .pt2 programs contain them).

    Cast(X ≥ T) · 2 − 1    →  htaf.Sign(X, T)                    (rule PlainSign)
    Cast(X ≥ T)            →  htaf.Heaviside(X, T), tie "ge"     (rule PlainHeaviside; Greater: tie "gt")

T must be a constant. The step keeps the comparison node's name and metadata, so the site it came
from can still be read off it. Sign rules run first, so a ±1 step is one node, not a Heaviside and
arithmetic.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from ..ops import HTAF_DOMAIN, HTAF_OPSET_VERSION
from .base import PassReport, apply_rules, report

COMPARISONS = {"ge": "GreaterOrEqual", "gt": "Greater"}


def _threshold_check(t: ir.Value) -> MatchResult:
    result = MatchResult()
    if t.const_value is None:
        return result.fail(f"threshold {t.name!r} is computed at run time, not a constant", t)
    return result


def _step(op, kind: str, x: ir.Value, t: ir.Value, tie: str, cmp: ir.Value) -> ir.Value:
    out = getattr(op, kind)(x, t, tie=tie, _domain=HTAF_DOMAIN, _version=HTAF_OPSET_VERSION)
    source, node = cmp.producer(), out.producer()
    node.name = source.name
    node.metadata_props.update(source.metadata_props)
    return out


class PlainHeaviside(RewriteRuleClassBase):
    """Cast(Compare(X, T), to=FLOAT) → htaf.Heaviside(X, T, tie)."""

    def __init__(self, tie: str) -> None:
        super().__init__(name=f"PlainHeaviside[{tie}]")
        self.tie = tie

    def pattern(self, op, x, t):
        return op.Cast(getattr(op, COMPARISONS[self.tie])(x, t, _outputs=["cmp"]), to=ir.DataType.FLOAT)

    def check(self, context, x, t, **_) -> MatchResult:
        return _threshold_check(t)

    def rewrite(self, op, x, t, cmp, **_):
        return _step(op, "Heaviside", x, t, self.tie, cmp)


class PlainSign(PlainHeaviside):
    """Sub(Mul(Cast(Compare(X, T), to=FLOAT), 2), 1) → htaf.Sign(X, T, tie)."""

    def __init__(self, tie: str) -> None:
        super().__init__(tie)
        self.name = f"PlainSign[{tie}]"

    def pattern(self, op, x, t):
        return op.Sub(op.Mul(super().pattern(op, x, t), 2.0), 1.0)

    def rewrite(self, op, x, t, cmp, **_):
        return _step(op, "Sign", x, t, self.tie, cmp)


SIGN_RULES = [PlainSign.rule(tie) for tie in COMPARISONS]
HEAVISIDE_RULES = [PlainHeaviside.rule(tie) for tie in COMPARISONS]


class RecognisePlainSteps(ir.passes.InPlacePass):
    """Lift plain-op steps to htaf ops; records the number lifted, refusals say why a comparison stayed."""

    def call(self, model: ir.Model) -> PassReport:
        signs, refused_signs = apply_rules(model, SIGN_RULES, commute=True)
        steps, refused = apply_rules(model, HEAVISIDE_RULES)
        del refused_signs  # what the sign rules refused, the Heaviside rules see again
        return report(model, modified=bool(signs + steps), refusals=refused)
