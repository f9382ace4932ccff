"""Keras emitters for decisions: comparisons, their logical combinations, and ``where`` on them; and the
broadcasting rule elementwise ops of two computed tensors share."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer

from .keras_builder import KerasBuilder, Val, tf


def broadcast_shape(a: Val, c: Val) -> tuple[int, ...] | None:
    """The common shape of two computed tensors of one layout, where one broadcasts to the other as numpy does:
    a per-channel gate (C, 1, 1) as squeeze-and-excite writes it, a per-position map (1, H, W) as XNOR-Net's
    scale K. Channels last, the ranks must match: one axis order for both broadcasts alike."""
    if a.layout != c.layout or (a.layout == "nhwc" and len(a.shape) != len(c.shape)):
        return None
    try:
        shape = tuple(np.broadcast_shapes(a.shape, c.shape))
    except ValueError:
        return None
    return shape if shape in (a.shape, c.shape) else None


COMPARE_OPS = {"Greater": tf.math.greater, "Less": tf.math.less, "Equal": tf.math.equal,
               "GreaterOrEqual": tf.math.greater_equal, "LessOrEqual": tf.math.less_equal}
MIRRORED = {"Greater": "Less", "Less": "Greater", "Equal": "Equal", "GreaterOrEqual": "LessOrEqual",
            "LessOrEqual": "GreaterOrEqual"}
LOGICAL_OPS = {"And": tf.math.logical_and, "Or": tf.math.logical_or, "Xor": tf.math.logical_xor}


def tensor_pair(b: KerasBuilder, node: ir.Node, a: Val, c: Val, op: Callable) -> list[Val]:
    """``op`` of two computed tensors of one layout, one broadcasting to the other (``broadcast_shape``)."""
    a, c = b.to_canonical(b.materialize(a)), b.to_canonical(b.materialize(c))
    shape = broadcast_shape(a, c)
    if shape is None:
        raise UnsupportedLayer(node.name, f"{node.op_type} of tensors shaped {a.shape} and {c.shape}")
    big = a if a.shape == shape else c
    t = b.lam(lambda zs: op(zs[0], zs[1]), [a.tensor, c.tensor], node.name or node.op_type)
    return [Val(t, big.shape, big.layout, source=big.source)]


def _compare(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """A comparison: of a tensor with a constant (``spike > 0`` before a ``where`` reset), either side, or of
    two computed tensors (``scores[:, 0] > scores[:, 1]``): a boolean tensor."""
    a, c = b.get(node.inputs[0]), b.get(node.inputs[1])
    kind = node.op_type
    if a.tensor is not None and c.tensor is not None:
        return tensor_pair(b, node, a, c, COMPARE_OPS[kind])
    if a.tensor is None:
        a, c, kind = c, a, MIRRORED[kind]
    if a.tensor is None or c.const is None:
        raise UnsupportedLayer(node.name, f"{node.op_type} of constants that capture did not fold")
    x = b.to_canonical(b.materialize(a))
    kc, op = b.const_like(c.const, x), COMPARE_OPS[kind]
    return [replace(x, tensor=b.lam(lambda z: op(z, kc), x.tensor, node.name or node.op_type))]


def _logical(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """And, Or, Xor of two computed decisions (``near & far``)."""
    a, c = b.get(node.inputs[0]), b.get(node.inputs[1])
    if a.tensor is None or c.tensor is None:
        raise UnsupportedLayer(node.name, f"{node.op_type} with a constant decision")
    return tensor_pair(b, node, a, c, LOGICAL_OPS[node.op_type])


def _not(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.get(node.inputs[0])
    if x.tensor is None:
        raise UnsupportedLayer(node.name, "Not of a constant decision")
    x = b.to_canonical(b.materialize(x))
    return [replace(x, tensor=b.lam(tf.math.logical_not, x.tensor, node.name or "Not"))]


def _where(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """where(condition, a, b) with a boolean tensor condition; either branch may be a constant (a zero reset)."""
    cond, *branches = (b.get(v) for v in node.inputs)
    computed = [b.to_canonical(b.materialize(v)) for v in branches if v.tensor is not None]
    if cond.tensor is None or not computed:
        raise UnsupportedLayer(node.name, "Where with a constant condition or constant branches")
    like, cond = computed[0], b.to_canonical(cond)
    if any(v.shape != like.shape or v.layout != like.layout for v in (*computed, cond)):
        raise UnsupportedLayer(node.name, "Where of tensors of different shapes")
    parts = [v.tensor if v.tensor is not None else b.const_like(v.const, like) for v in branches]  # type: ignore[arg-type]
    inputs = [cond.tensor] + [p for p in parts if not isinstance(p, np.ndarray)]

    def select(zs):
        it = iter(zs[1:])
        yes, no = (p if isinstance(p, np.ndarray) else next(it) for p in parts)
        return tf.where(zs[0], yes, no)

    return [replace(like, tensor=b.lam(select, inputs, node.name or "Where"))]


DECISION_EMITTERS: dict[tuple[str, str], Callable[[KerasBuilder, ir.Node], list[Val]]] = {
    **{("", op): _compare for op in COMPARE_OPS}, **{("", op): _logical for op in LOGICAL_OPS},
    ("", "Not"): _not, ("", "Where"): _where,
}
