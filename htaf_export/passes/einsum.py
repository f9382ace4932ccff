"""``torch.einsum`` written for a dense layer (``einsum("bi,oi->bo", x, w)``, ``"bti,oi->bto"``): one ONNX
Einsum, which TFLite has no kernel for and no converter reads as a layer. Rewritten as the MatMul it is (a
Transpose of each operand where its axes are in another order, and of the result), so that it converts everywhere
and a ±1 weight makes it a binary layer like ``F.linear``. Other equations stay Einsum."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import PassReport, report
from .util import attr, const_array, new_initializer


def _matmul_axes(equation: str) -> tuple[str, str, str, str] | None:
    """(left operand, right operand, result, contracted letter) when ``equation`` is a product over one letter of a
    tensor and a matrix whose other letter is the result's own; None for any other equation."""
    if "..." in equation or "->" not in equation or equation.count(",") != 1:
        return None
    inputs, result = equation.replace(" ", "").split("->")
    left, right = inputs.split(",")
    shared = set(left) & set(right)
    if len(right) != 2 or len(shared) != 1 or any(len(set(s)) != len(s) for s in (left, right, result)):
        return None
    k = shared.pop()
    free = [c for c in left if c != k]
    other = right.replace(k, "")
    if k in result or sorted(result) != sorted(free + [other]):
        return None
    return left, right, result, k


def _transposed(graph: ir.Graph, value: ir.Value, have: str, want: str, name: str, nodes: list[ir.Node]
                ) -> ir.Value:
    """``value`` with its axes from ``have`` to ``want`` order: a constant transposed here (so that it keeps its
    parameter's name, and so the layer's), a computed tensor by a Transpose node."""
    if have == want:
        return value
    perm = [have.index(c) for c in want]
    array = const_array(value)
    if array is not None and value.name:
        return new_initializer(graph, f"{value.name}.transposed", np.ascontiguousarray(array.transpose(perm)))
    node = ir.node("Transpose", [value], {"perm": perm}, name=name)
    nodes.append(node)
    return node.outputs[0]


class EinsumAsMatMul(ir.passes.InPlacePass):
    """Rewrite two-operand Einsums that are a matrix product with one matrix (see the module docstring)."""

    def call(self, model: ir.Model) -> PassReport:
        rewritten = []
        for node in list(model.graph):
            axes = _matmul_axes(str(attr(node, "equation", ""))) if node.op_type == "Einsum" and node.domain == "" \
                else None
            if axes is None or len(node.inputs) != 2:
                continue
            left, right, result, k = axes
            free = "".join(c for c in left if c != k)
            other = right.replace(k, "")
            nodes: list[ir.Node] = []
            g = model.graph
            a = _transposed(g, node.inputs[0], left, free + k, f"{node.name}/left", nodes)  # type: ignore[arg-type]
            b = _transposed(g, node.inputs[1], right, k + other, f"{node.name}/right", nodes)  # type: ignore[arg-type]
            product = ir.node("MatMul", [a, b], name=f"{node.name}/matmul")
            nodes.append(product)
            y = _transposed(g, product.outputs[0], free + other, result, f"{node.name}/result", nodes)
            ir.convenience.replace_nodes_and_values(model.graph, node, [node], nodes, [node.outputs[0]], [y])
            rewritten.append(node.name)
        return report(model, rewritten)
