"""Recognise exact steps written with plain ops (as traced TorchScript or .pt2 programs contain them).

    Cast(X ≥ T)            →  htaf.Heaviside(X, T), tie "ge"     (Greater: tie "gt")
    Cast(X ≥ T) · 2 − 1    →  htaf.Sign(X, T)

T must be a constant. The rewritten node keeps the comparison node's name and metadata, so the
site it came from can still be read off it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..ops import HTAF_DOMAIN
from .util import const_array

COMPARISONS = {"GreaterOrEqual": "ge", "Greater": "gt"}


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    return node if node.op_type == op_type and node.domain == "" else None


def _other_constant(node: ir.Node, value: ir.Value) -> np.ndarray | None:
    others = [v for v in node.inputs if v is not value]
    return const_array(others[0]) if len(others) == 1 else None


def recognise_plain_steps(model: ir.Model) -> tuple[ir.Model, int]:
    graph = model.graph
    count = 0
    for compare in [n for n in graph if n.domain == "" and n.op_type in COMPARISONS]:
        x, t = compare.inputs[0], compare.inputs[1]
        if x is None or const_array(t) is None:
            continue
        cast = _only_consumer(compare.outputs[0], "Cast")
        if cast is None or cast.attributes["to"].as_int() != ir.DataType.FLOAT:
            continue
        op, last, removed = "Heaviside", cast, [compare, cast]
        mul = _only_consumer(cast.outputs[0], "Mul")
        if mul is not None and np.all(_other_constant(mul, cast.outputs[0]) == 2):
            sub = _only_consumer(mul.outputs[0], "Sub")
            if sub is not None and sub.inputs[0] is mul.outputs[0] and np.all(const_array(sub.inputs[1]) == 1):
                op, last, removed = "Sign", sub, removed + [mul, sub]
        step = ir.node(op, [x, t], {"tie": COMPARISONS[compare.op_type]}, domain=HTAF_DOMAIN, name=compare.name,
                       metadata_props=dict(compare.metadata_props))
        graph.insert_before(compare, step)
        out = last.outputs[0]
        step.outputs[0].name = out.name
        was_output = out.is_graph_output()
        out.replace_all_uses_with(step.outputs[0], replace_graph_outputs=True)
        if was_output:
            out.name = None
            step.outputs[0].name = graph.outputs[[o is step.outputs[0] for o in graph.outputs].index(True)].name
        graph.remove(list(reversed(removed)), safe=True)
        count += 1
    return model, count
