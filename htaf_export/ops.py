"""The ``htaf`` ONNX domain: the step ops every target reproduces, and their ONNX function bodies.

    Heaviside(X, T) → {0, 1};  Sign(X, T) → {−1, +1};  attribute tie: "ge" fires at X = T, "gt" does not.

The function bodies (a comparison and a cast or select) let stock ONNX Runtime run a graph of htaf ops.
"""

from __future__ import annotations

import onnx
from onnx import helper

from .contracts import STEP_OPS

HTAF_DOMAIN = "htaf"
HTAF_OPSET_VERSION = 1
OPSET = 18

__all__ = ["HTAF_DOMAIN", "HTAF_OPSET_VERSION", "OPSET", "STEP_OPS", "step_function", "attach_step_functions"]


def step_function(op: str, tie: str, overload: str = "") -> onnx.FunctionProto:
    """Body of htaf.Heaviside (→ {0,1}) or htaf.Sign (→ {−1,+1}) for one tie rule."""
    compare = "GreaterOrEqual" if tie == "ge" else "Greater"
    nodes = [helper.make_node(compare, ["X", "T"], ["fired"])]
    if op == "Heaviside":
        nodes.append(helper.make_node("CastLike", ["fired", "X"], ["Y"]))
    else:
        nodes += [
            helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])),
            helper.make_node("Constant", [], ["minus_one"],
                             value=helper.make_tensor("minus_one", onnx.TensorProto.FLOAT, [], [-1.0])),
            helper.make_node("CastLike", ["one", "X"], ["one_x"]),
            helper.make_node("CastLike", ["minus_one", "X"], ["minus_one_x"]),
            helper.make_node("Where", ["fired", "one_x", "minus_one_x"], ["Y"]),
        ]
    doc = (f"{op}(X, T): {'1' if op == 'Heaviside' else '+1'} where X {'>=' if tie == 'ge' else '>'} T, "
           f"else {'0' if op == 'Heaviside' else '-1'} (tie rule '{tie}').")
    function = helper.make_function(HTAF_DOMAIN, op, ["X", "T"], ["Y"], nodes,
                                    [helper.make_opsetid("", OPSET)], attributes=["tie"], doc_string=doc)
    if overload:  # proto2: an explicit "" would be written out
        function.overload = overload
    return function


def step_ties(proto: onnx.ModelProto) -> list[str]:
    """The tie rules the htaf nodes of ``proto`` declare, sorted."""
    return sorted({a.s.decode() for n in proto.graph.node if n.domain == HTAF_DOMAIN
                   for a in n.attribute if a.name == "tie"})


def attach_step_functions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give ``proto`` (in place) the function bodies of the htaf ops it uses, and the opsets they need.

    A function body cannot branch on a string attribute at this opset, so when the steps of one graph
    declare different tie rules each node calls the overload named after its rule (ONNX function
    overloads, IR version 10): ``htaf.Heaviside`` with overload ``gt`` compares with Greater. ONNX
    Runtime and the onnx inliner honour overloads; ``onnx.reference`` ignores them (use ``--portable``)."""
    ops = sorted({n.op_type for n in proto.graph.node if n.domain == HTAF_DOMAIN})
    ties = step_ties(proto)
    if len(ties) > 1:
        for node in proto.graph.node:
            if node.domain == HTAF_DOMAIN:
                node.overload = next(a.s.decode() for a in node.attribute if a.name == "tie")
        used = sorted({(n.op_type, n.overload) for n in proto.graph.node if n.domain == HTAF_DOMAIN})
        proto.functions.extend(step_function(op, tie, overload=tie) for op, tie in used)
    else:
        proto.functions.extend(step_function(op, ties[0] if ties else "ge") for op in ops)
    if ops:
        del proto.opset_import[:]
        proto.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(HTAF_DOMAIN, HTAF_OPSET_VERSION)])
    return proto


def lower_steps(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (in place) with each htaf node replaced by standard ops under its own tie rule, so graphs whose
    steps declare different rules run anywhere."""
    nodes = []
    for k, node in enumerate(proto.graph.node):
        if node.domain != HTAF_DOMAIN:
            nodes.append(node)
            continue
        tie = next((a.s.decode() for a in node.attribute if a.name == "tie"), "ge")
        x, t = node.input[0], node.input[1]
        fired = f"{node.output[0]}/fired_{k}"
        nodes.append(helper.make_node("GreaterOrEqual" if tie == "ge" else "Greater", [x, t], [fired]))
        if node.op_type == "Heaviside":
            nodes.append(helper.make_node("CastLike", [fired, x], [node.output[0]]))
        else:
            one, minus = f"{fired}/one", f"{fired}/minus_one"
            nodes += [helper.make_node("Constant", [], [one], value=helper.make_tensor(one, onnx.TensorProto.FLOAT, [], [1.0])),
                      helper.make_node("Constant", [], [minus],
                                       value=helper.make_tensor(minus, onnx.TensorProto.FLOAT, [], [-1.0])),
                      helper.make_node("Where", [fired, one, minus], [node.output[0]])]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [o for o in proto.opset_import if o.domain != HTAF_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto
