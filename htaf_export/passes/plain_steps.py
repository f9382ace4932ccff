"""Recognise exact steps written with plain ops (as traced TorchScript or .pt2 programs contain them).

    Cast(X ≥ T) · 2 − 1    →  htaf.Sign(X, T)                    (rule PlainSign)
    Cast(X ≥ T)            →  htaf.Heaviside(X, T), tie "ge"     (rule PlainHeaviside; Greater: tie "gt")
    Where(X ≥ T, 1, −1)    →  htaf.Sign(X, T)                    (rule WhereStep; 1, 0: htaf.Heaviside;
                                                                   the 1 and −1 may be ones_like(X) and its negation)

T must be a constant. The step keeps the comparison node's name and metadata, so the site it came
from can still be read off it. Sign rules run first, so a ±1 step is one node, not a Heaviside and
arithmetic.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from ..ops import HTAF_DOMAIN, HTAF_OPSET_VERSION
from .base import PassReport, apply_rules, report
from .util import const_array

COMPARISONS = {"ge": "GreaterOrEqual", "gt": "Greater"}


def _step_check(x: ir.Value, t: ir.Value) -> MatchResult:
    result = MatchResult()
    if t.const_value is None:
        return result.fail(f"threshold {t.name!r} is computed at run time, not a constant", t)
    if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        return result.fail(f"the step input is {x.dtype}, not float32 (a step keeps its input's type)", x)
    return result


def _exactly(value: ir.Value, number: float) -> bool:
    array = const_array(value)
    return array is not None and array.size == 1 and float(array.reshape(())) == number


def _fill(value: ir.Value, x: ir.Value) -> float | None:
    """The number ``value`` holds everywhere: a scalar constant, or that constant expanded to X's shape
    (what torch.ones_like(x) / zeros_like / full_like become), negated or not."""
    array = const_array(value)
    if array is not None:
        return float(array.reshape(())) if array.size == 1 else None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Neg" and node.domain == "":
        inner = _fill(node.inputs[0], x)
        return -inner if inner is not None else None
    if node.op_type == "Expand" and node.domain == "" and _shape_of(node.inputs[1], x):
        return _fill(node.inputs[0], x) if const_array(node.inputs[0]) is not None else None
    if node.op_type == "ConstantOfShape" and node.domain == "" and (_shape_of(node.inputs[0], x) or
                                                                   _broadcast_scalar(node.inputs[0], x)):
        # what TorchScript's exporter makes of ones_like(x) / zeros_like(x) (and x.new_ones(())): the fill is the
        # `value` attribute (a one-element tensor; 0.0 when absent)
        attr = node.attributes.get("value")
        if attr is None:
            return 0.0
        array = attr.as_tensor().numpy()
        return float(array.reshape(())) if array.size == 1 else None
    return None


def _broadcast_scalar(shape: ir.Value | None, x: ir.Value) -> bool:
    """A constant shape of ones no longer than X's rank (``()``, ``(1, 1)``): filled, it broadcasts to X's shape."""
    dims = const_array(shape) if shape is not None else None
    rank = len(x.shape) if x.shape is not None else 0
    return dims is not None and dims.ndim == 1 and len(dims) <= rank and bool(np.all(dims == 1))


def _same_known_shape(a: ir.Value | None, b: ir.Value) -> bool:
    """Both shapes known and equal, dimension by dimension (a symbolic batch the same symbol): ones_like(h) of
    a layer's input h beside the layer's output x, as a TorchScript trace of where(l(h) > 0, ones_like(h), …)."""
    if a is None or a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(isinstance(p, int) and p == q or not isinstance(p, int) and str(p) == str(q) and str(p) != "None"
               for p, q in zip(a.shape, b.shape))


def _shape_of(value: ir.Value | None, x: ir.Value) -> bool:
    """``value`` is Shape(X) itself: the filled tensor has exactly X's shape, so the step keeps it."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Shape" or not (node.inputs[0] is x or _same_known_shape(node.inputs[0], x)):
        return False
    start, end = node.attributes.get("start"), node.attributes.get("end")  # the whole shape, not a slice of it
    return (start is None or start.as_int() == 0) and end is None


def _step(op, kind: str, x: ir.Value, t: ir.Value, tie: str, cmp: ir.Value) -> ir.Value:
    out = getattr(op, kind)(x, t, tie=tie, _domain=HTAF_DOMAIN, _version=HTAF_OPSET_VERSION)
    source, node = cmp.producer(), out.producer()
    node.name = source.name
    node.metadata_props.update(source.metadata_props)
    return out


class _StepRule(RewriteRuleClassBase):
    """A rule for one tie rule: its comparison is GreaterOrEqual (ge) or Greater (gt)."""

    def __init__(self, tie: str) -> None:
        super().__init__(name=f"{type(self).__name__}[{tie}]")
        self.tie = tie

    def compare(self, op, x, t):
        return getattr(op, COMPARISONS[self.tie])(x, t, _outputs=["cmp"])


class PlainHeaviside(_StepRule):
    """Cast(Compare(X, T), to=FLOAT) → htaf.Heaviside(X, T, tie)."""

    def pattern(self, op, x, t):
        return op.Cast(self.compare(op, x, t), to=ir.DataType.FLOAT)

    def check(self, context, x, t, **_) -> MatchResult:
        return _step_check(x, t)

    def rewrite(self, op, x, t, cmp, **_):
        return _step(op, "Heaviside", x, t, self.tie, cmp)


class PlainSign(_StepRule):
    """Sub(Mul(Cast(Compare(X, T), to=FLOAT), 2), 1) → htaf.Sign(X, T, tie)."""

    def pattern(self, op, x, t, two, one):
        return op.Sub(op.Mul(op.Cast(self.compare(op, x, t), to=ir.DataType.FLOAT), two), one)

    def check(self, context, x, t, two, one, **_) -> MatchResult:
        if not (_exactly(two, 2.0) and _exactly(one, 1.0)):
            return MatchResult().fail("not 2·H − 1 exactly", two)
        return _step_check(x, t)

    def rewrite(self, op, x, t, cmp, **_):
        return _step(op, "Sign", x, t, self.tie, cmp)


class WhereStep(_StepRule):
    """Where(Compare(X, T), 1, −1) → htaf.Sign(X, T, tie); Where(Compare(X, T), 1, 0) → htaf.Heaviside.
    The branches may be scalars or tensors of X's shape filled with them (ones_like(x), −ones_like(x))."""

    def pattern(self, op, x, t, on, off):
        return op.Where(self.compare(op, x, t), on, off)

    def check(self, context, x, t, on, off, **_) -> MatchResult:
        if not (_fill(on, x) == 1.0 and _fill(off, x) in (-1.0, 0.0)):
            return MatchResult().fail("not a choice between 1 and −1 (or 0)", on)
        return _step_check(x, t)

    def rewrite(self, op, x, t, cmp, off, **_):
        return _step(op, "Sign" if _fill(off, x) == -1.0 else "Heaviside", x, t, self.tie, cmp)


class _AroundStep(RewriteRuleClassBase):
    """A rule that rewrites what surrounds an htaf step ``S`` (Sign or Heaviside) into the step of X itself."""

    def __init__(self, kind: str) -> None:
        super().__init__(name=f"{type(self).__name__}[{kind}]")
        self.kind = kind

    def rewrite(self, op, x, t, s, **_):
        return _step(op, self.kind, x, t, s.producer().attributes["tie"].as_string(), s)


class StraightThrough(_AroundStep):
    """Add(X, Sub(S, X)) with S a step of X → S: the straight-through estimator x + (step(x) − x).detach()
    written by hand (the detach leaves no node). In eval it is the step up to the rounding of x + (s − x), which
    for |x| ≥ 2 is not ±1: the step it stands for is what gets exported (as a traced program's is)."""

    def pattern(self, op, x, t):
        step = getattr(op, self.kind)(x, t, _domain=HTAF_DOMAIN, _outputs=["s"])
        return op.Add(x, op.Sub(step, x))


class ClippedStep(_AroundStep):
    """Step(Clip(X, lo, hi), T) with lo < T < hi everywhere → Step(X, T): a clamp (BinaryNet's Hardtanh before
    its sign) changes no decision of a step strictly inside its range, and without it a batch norm before it folds
    into the step's threshold."""

    def pattern(self, op, x, lo, hi, t):
        return getattr(op, self.kind)(op.Clip(x, lo, hi), t, _domain=HTAF_DOMAIN, _outputs=["s"])

    def check(self, context, x, lo, hi, t, **_) -> MatchResult:
        low, high, theta = const_array(lo), const_array(hi), const_array(t)
        if low is None or high is None or theta is None or low.size != 1 or high.size != 1:
            return MatchResult().fail("a clip without constant bounds, or a computed threshold", lo)
        if not (float(low.reshape(())) < float(theta.min()) and float(theta.max()) < float(high.reshape(()))):
            return MatchResult().fail("a threshold on or outside the clip's range", t)
        return MatchResult()


class MirroredComparison(RewriteRuleClassBase):
    """LessOrEqual(T, X) → GreaterOrEqual(X, T) and Less(T, X) → Greater(X, T), T a constant: how the TorchScript
    exporter writes x >= t for a scalar parameter t. The same decision for every float (NaN included)."""

    def __init__(self, tie: str) -> None:
        super().__init__(name=f"MirroredComparison[{tie}]")
        self.tie = tie

    def pattern(self, op, t, x):
        return getattr(op, "LessOrEqual" if self.tie == "ge" else "Less")(t, x)

    def check(self, context, t, x, **_) -> MatchResult:
        if t.const_value is None or x.const_value is not None:
            return MatchResult().fail("not a constant compared with a computed tensor", t)
        return MatchResult()

    def rewrite(self, op, t, x, **_):
        return getattr(op, COMPARISONS[self.tie])(x, t)


MIRRORED_RULES = [MirroredComparison.rule(tie) for tie in COMPARISONS]
SIGN_RULES = [PlainSign.rule(tie) for tie in COMPARISONS] + [WhereStep.rule(tie) for tie in COMPARISONS]
CLIPPED_RULES = [ClippedStep.rule("Sign"), ClippedStep.rule("Heaviside")]
STRAIGHT_THROUGH_RULES = [StraightThrough.rule("Sign"), StraightThrough.rule("Heaviside")]
HEAVISIDE_RULES = [PlainHeaviside.rule(tie) for tie in COMPARISONS]


class RecognisePlainSteps(ir.passes.InPlacePass):
    """Lift plain-op steps to htaf ops; records the number lifted, refusals say why a comparison stayed."""

    def call(self, model: ir.Model) -> PassReport:
        mirrored, _ = apply_rules(model, MIRRORED_RULES)
        signs, refused_signs = apply_rules(model, SIGN_RULES, commute=True)
        steps, refused = apply_rules(model, HEAVISIDE_RULES)
        del refused_signs  # what the sign rules refused, the Heaviside rules see again
        folded, _ = apply_rules(model, STRAIGHT_THROUGH_RULES, commute=True)
        unclipped, _ = apply_rules(model, CLIPPED_RULES)
        return report(model, modified=bool(mirrored + signs + steps + folded + unclipped), refusals=refused)
