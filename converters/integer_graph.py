"""Rewrite a graph of fused binary layers and steps so that step activations flow between binary layers as
integers, and float only where a float op reads them.

Every step (an ``htaf`` step node, or a binary layer in threshold mode) becomes a bool tensor "fired" and,
for float readers, its float value decoded from it (Where/Cast). A binary layer reads the integer encoding
its ops want (``int8_layers.Encoding``), made from "fired" and replayed through the ops between them
(pooling, reshapes, level-valued pads), so that no float op runs between two binary layers. The float
copies nothing reads are removed by the final clean-up. Step tensors keep their names: the float value
where one survives, else the bool, which the ONNX Runtime runner decodes by the step's op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from htaf_export.passes.util import is_step

from . import int8_layers as il
from .layer_ops import per_channel_tail
from .integer_steps import _layer_nodes as float_layer_nodes
from .tflite_binary import DOMAIN, OP, BinaryLayer, _pad_spec, copies_values, input_levels

FIRED_SUFFIX = "/fired"


@dataclass(frozen=True)
class LoweredLayer:
    """How one binary layer was written: "integer" ops or the "float" conv, and why not integer."""

    layer: BinaryLayer
    form: str
    ops: str
    reason: str = ""


@dataclass
class IntegerGraph:
    """Rewrites ``graph`` in place (``lower``); remembers each step's fired/float pair for naming."""

    graph: ir.Graph
    fired: dict[int, tuple[ir.Value, str]] = field(default_factory=dict)  # id(float step value) → (bool, levels)
    encoded: dict[tuple[int, str], ir.Value] = field(default_factory=dict)  # (id(float value), levels) → uint8
    steps: list[tuple[str, ir.Value]] = field(default_factory=list)  # (step name, its bool)
    decoded: dict[str, ir.Value] = field(default_factory=dict)  # step name → its float value
    lowered: list[LoweredLayer] = field(default_factory=list)

    def lower(self) -> None:
        levels = {id(n): input_levels(n.inputs[0]) for n in self.graph if n.domain == DOMAIN and n.op_type == OP}
        for node in list(self.graph):
            if is_step(node):
                self._step(node)
            elif node.domain == DOMAIN and node.op_type == OP:
                self._binary(node, levels[id(node)])

    # ---- steps ---------------------------------------------------------------------------------

    def _step(self, node: ir.Node) -> None:
        tie = node.attributes["tie"].as_string()
        compare = ir.node("GreaterOrEqual" if tie == "ge" else "Greater", list(node.inputs[:2]), name=f"{node.name}/fired")
        levels = "pm1" if node.op_type == "Sign" else "01"
        self._replace_step(node, [compare], compare.outputs[0], levels)

    def _replace_step(self, node: ir.Node, nodes: list[ir.Node], fired: ir.Value, levels: str) -> None:
        old = node.outputs[0]
        name = str(old.name)
        decode = _decode(self.graph, fired, levels, name)
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], [*nodes, decode], [old], [decode.outputs[0]])
        fired.name = name + FIRED_SUFFIX
        self.fired[id(decode.outputs[0])] = (fired, levels)
        self.steps.append((name, fired))
        self.decoded[name] = decode.outputs[0]

    # ---- binary layers -------------------------------------------------------------------------

    def _binary(self, node: ir.Node, levels: str | None) -> None:
        layer: BinaryLayer = node.meta["binary"]
        name = f"{layer.name}/int8"
        source = node.inputs[0]
        reason = il.float_reason(layer, levels) if levels else "its input is not step activations here"
        x = None if reason else self._encoded(source, il.Encoding(levels))  # type: ignore[arg-type]
        if x is None:
            nodes, y = float_layer_nodes(self.graph, layer, source, name)  # the conv carries layer.bias, if any
            self.lowered.append(LoweredLayer(layer, "float", "Conv" if layer.kind == "conv" else "Gemm",
                                             reason or "its input could not be encoded as integers"))
            if layer.mode == "threshold":
                zero = il._const(self.graph, "htaf.int8.zero_f", np.array(0.0, np.float32))
                fired = ir.node("Greater", [y, zero], name=f"{name}/fired")  # y = flip·v − T + ½ is never 0
                return self._replace_step(node, nodes + [fired], fired.outputs[0], layer.levels or "pm1")
            tail, y = per_channel_tail(self.graph, layer, y, name) if layer.scale is not None else ([], y)
            return self._replace_output(node, nodes + tail, y)
        enc = il.Encoding(levels)  # type: ignore[arg-type]
        if layer.mode == "threshold":
            build = il.threshold_conv if layer.kind == "conv" else il.threshold_dense
            nodes, fired = build(self.graph, layer, x, enc, name)
            self.lowered.append(LoweredLayer(layer, "integer", _ops(nodes)))
            return self._replace_step(node, nodes, fired, layer.levels or "pm1")
        nodes, y = il.affine_integer(self.graph, layer, x, enc, name)
        self.lowered.append(LoweredLayer(layer, "integer", _ops(nodes)))
        self._replace_output(node, nodes, y)

    def _replace_output(self, node: ir.Node, nodes: list[ir.Node], y: ir.Value) -> None:
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], nodes, [node.outputs[0]], [y])

    def _encoded(self, value: ir.Value, enc: il.Encoding) -> ir.Value | None:
        """``value`` (float step activations) in ``enc``, computed from the bools, or None."""
        key = (id(value), enc.levels)
        if key in self.encoded:
            return self.encoded[key]
        made: ir.Value | None = None
        if id(value) in self.fired:
            fired, _ = self.fired[id(value)]
            hi, lo = enc.fired_values()
            node = ir.node("Where", [fired, il._const(self.graph, f"htaf.int8.{enc.levels}_hi", hi),
                                     il._const(self.graph, f"htaf.int8.{enc.levels}_lo", lo)],
                           name=f"{value.name}/u8")
            self.graph.append(node)
            made = node.outputs[0]
        else:
            producer = value.producer()
            if producer is not None and producer.domain == "":
                made = self._replayed(producer, enc)
        if made is not None:
            made.name = f"{value.name}.u8"
            self.encoded[key] = made
        return made

    def _replayed(self, node: ir.Node, enc: il.Encoding) -> ir.Value | None:
        """A pooling/reshape/pad node run again on the encoded input."""
        pad = _pad_spec(node)
        if node.op_type == "Concat":
            parts = [self._encoded(v, enc) for v in node.inputs]
            if any(p is None for p in parts):
                return None
            copy = ir.node("Concat", parts, {k: v for k, v in node.attributes.items()}, name=f"{node.name}/u8")
            self.graph.append(copy)
            return copy.outputs[0]
        if not copies_values(node) and (pad is None or not enc.stores(pad[1])):
            return None
        source = self._encoded(node.inputs[0], enc)
        if source is None:
            return None
        inputs = [source, *node.inputs[1:]]
        if pad is not None:
            value = il._const(self.graph, f"htaf.int8.pad_{int(pad[1]) + enc.zero_point}", enc.of(pad[1]))
            inputs = [source, node.inputs[1], value]
        copy = ir.node(node.op_type, inputs, {k: v for k, v in node.attributes.items()}, name=f"{node.name}/u8")
        self.graph.append(copy)
        return copy.outputs[0]

    def name_steps(self, twins: dict[int, ir.Value]) -> tuple[str, ...]:
        """After clean-up: a step's tensor is its float value where one is left, else its bool, else the
        channels-last twin of either (``channels_last``); → the names of the steps stored channels-last."""
        present = {id(v) for n in self.graph for v in n.outputs} | {id(v) for v in self.graph.outputs}
        by_name = {v.name: v for n in self.graph for v in n.outputs}
        channels_last = []
        for name, fired in self.steps:
            value = by_name.get(name)
            if value is not None and id(value) in present:
                continue
            if id(fired) in present:
                if fired.name == name + FIRED_SUFFIX:
                    fired.name = name
                continue
            twin = next((t for t in (twins.get(id(self.decoded.get(name))), twins.get(id(fired)))
                         if t is not None and id(t) in present), None)
            if twin is not None:
                twin.name = name
                channels_last.append(name)
        return tuple(channels_last)


def _decode(graph: ir.Graph, fired: ir.Value, levels: str, name: str) -> ir.Node:
    if levels == "01":
        return ir.node("Cast", [fired], {"to": ir.DataType.FLOAT}, name=f"{name}/float")
    return ir.node("Where", [fired, il._const(graph, "htaf.int8.plus_one", np.array(1.0, np.float32)),
                             il._const(graph, "htaf.int8.minus_one", np.array(-1.0, np.float32))], name=f"{name}/float")


def _ops(nodes: list[ir.Node]) -> str:
    main = [n.op_type for n in nodes if n.op_type in ("QLinearConv", "MatMulInteger")]
    return main[0] + (" (im2col)" if any(n.op_type == "Concat" for n in nodes) else "") if main else "?"


__all__ = ["IntegerGraph", "LoweredLayer", "FIRED_SUFFIX"]
