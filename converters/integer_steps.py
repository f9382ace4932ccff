"""Steps fed by a binary layer compare integers: the exact integer threshold, for every target.

A binary conv or dense layer on ±1 inputs sums ±1 products: its pre-activation v is an integer, exact in
float32. Whatever follows it before a step (bias, scale, batch norm…) is, on those integers, the rule
"fires iff flip·v ≥ T" per channel (``integer_thresholds``, evaluated with the reference's own float32
operations, both tie rules). This pass writes the layer as ``conv(x, flip·W) + (½ − T)``, whose output is
never 0 and has the step's sign, followed by the step at 0: no batch norm, no float threshold, so no
rounding can flip a bit, and the tie rule is kept because the comparison never meets a tie.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from htaf_export.ops import HTAF_DOMAIN, HTAF_OPSET_VERSION
from htaf_export.passes.base import PassReport, report
from htaf_export.passes.util import new_initializer

from .layer_ops import padding
from .tflite_binary import BinaryLayer, Rejected, match


def _layer_nodes(graph: ir.Graph, layer: BinaryLayer, source: ir.Value, name: str) -> tuple[list[ir.Node], ir.Value]:
    """The layer as standard ops: [Pad] + Conv, or Gemm, with the folded ±1 weights and the ½ − T bias."""
    folded = layer.folded_bias()
    bias = new_initializer(graph, f"{layer.name}.bias", folded) if folded is not None else None
    matrix = layer.kind == "dense" and not (source.shape is not None and source.shape.rank() == 2)
    # Gemm takes 2-D inputs only: at each position of [N, …, F] (or a rank not known), MatMul with Wᵀ and Add
    weight = new_initializer(graph, f"{layer.name}.weight",
                             np.ascontiguousarray(layer.folded_weight().T) if matrix else layer.folded_weight())
    if matrix:
        product = ir.node("MatMul", [source, weight], name=f"{name}/matmul")
        if bias is None:
            return [product], product.outputs[0]
        add = ir.node("Add", [product.outputs[0], bias], name=f"{name}/bias")
        return [product, add], add.outputs[0]
    if layer.kind == "dense":
        gemm = ir.node("Gemm", [source, weight, bias], {"transB": 1}, name=f"{name}/gemm")
        return [gemm], gemm.outputs[0]
    value = np.array(layer.padding.value if layer.padding else 0.0, np.float32)
    nodes, source, pads = padding(graph, layer, source, value, layer.name)
    conv = ir.node("Conv", [source, weight, bias],
                   {"strides": list(layer.stride), "pads": pads, "dilations": list(layer.dilation),
                    "group": layer.group}, name=f"{name}/conv")
    return nodes + [conv], conv.outputs[0]


class IntegerThresholdSteps(ir.passes.InPlacePass):
    """Rewrite each binary layer + step (threshold mode, see the module docstring); records the layers."""

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        layers: list[BinaryLayer] = []
        for node in list(graph):
            if node.graph is None:  # removed by an earlier rewrite
                continue
            found = match(node, bitpacked=False)
            if found is None or isinstance(found, Rejected) or found[0].mode != "threshold":
                continue
            layer, absorbed, out = found
            step = absorbed[-1]
            nodes, y = _layer_nodes(graph, layer, absorbed[0].inputs[0], str(step.outputs[0].name))
            zero = new_initializer(graph, f"{out.name}.threshold", np.array(0.0, np.float32))
            new_step = ir.node(step.op_type, [y, zero], {"tie": step.attributes["tie"].as_string()},
                               domain=HTAF_DOMAIN, version=HTAF_OPSET_VERSION, name=step.name,
                               metadata_props=dict(step.metadata_props))
            new_step.outputs[0].metadata_props.update(out.metadata_props)
            old = [v for n in absorbed for v in n.inputs if v is not None and v.name in graph.initializers]
            ir.convenience.replace_nodes_and_values(graph, step, absorbed, [*nodes, new_step], [out],
                                                   [new_step.outputs[0]])
            _settle_names(graph, old, [v for n in nodes for v in n.inputs if v is not None and v.const_value is not None])
            layers.append(layer)
        return report(model, layers)


def _settle_names(graph: ir.Graph, old: list[ir.Value], new: list[ir.Value]) -> None:
    """Drop the replaced layer's initializers nothing uses now, so its new weights take their names."""
    for value in old:
        if not value.uses() and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
    for value in new:
        clean = value.name.rsplit("_", 1)[0] if value.name and value.name[-1].isdigit() and "_" in value.name else None
        if clean and clean not in graph.initializers and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
            value.name = clean
            graph.register_initializer(value)
