"""Steps, binary layers and ±1 weights of the IR as QONNX custom ops (``BipolarQuant``, ``MultiThreshold``).

QONNX semantics (qonnx 1.0): ``BipolarQuant(x, s)`` = s·(+1 where x >= 0 else −1); ``MultiThreshold(x, T)``
= out_scale·#{t in T[c] : x >= t} + out_bias per channel c. One threshold per channel gives a step: {0, 1}
with scale 1 and bias 0 (BINARY), ±1 with scale 2 and bias −1 (BIPOLAR).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer
from htaf_export.passes.pack_weights import channel_axis
from htaf_export.passes.util import WEIGHT_INPUTS, const_array, is_step, replacing_initializer, sign_factor

from .layer_ops import padding, per_channel_tail
from .tflite_binary import DOMAIN, OP, BinaryLayer

QONNX_DOMAIN = "qonnx.custom_op.general"
STEP_FORMS = {"pm1": ("BIPOLAR", 2.0, -1.0), "01": ("BINARY", 1.0, 0.0)}  # out_dtype, out_scale, out_bias
LAYOUTS = {2: "NC", 3: "NCW", 4: "NCHW", 5: "NCDHW"}


def _qonnx(op: str, inputs: list[ir.Value], attributes: dict | None = None, name: str = "") -> ir.Node:
    return ir.node(op, inputs, attributes or {}, domain=QONNX_DOMAIN, version=1, name=name)


def _layout(rank: int, axis: int) -> str:
    """A data_layout string for MultiThreshold with the channel at ``axis``."""
    letters = list(LAYOUTS.get(rank, "N" + "C" + "X" * (rank - 2)).replace("C", ""))
    letters.insert(axis, "C")
    return "".join(letters)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def threshold_rows(theta: np.ndarray, rank: int | None, step: str) -> tuple[np.ndarray, str | None]:
    """Thresholds as MultiThreshold wants them ([C, 1]) and the data_layout naming their channel axis."""
    flat = theta.reshape(-1)
    if flat.size == 1:
        return flat.reshape(1, 1), None
    if rank is None:  # only a threshold shaped like the tensor itself ([1, C, 1, 1]) says where its channel is
        if theta.ndim < 2 or theta.shape[0] != 1:
            raise UnsupportedLayer(step, "the rank of its input is unknown, so its per-channel threshold has no axis")
        rank = theta.ndim
    shape = (1,) * (rank - theta.ndim) + theta.shape
    varying = [i for i, d in enumerate(shape) if d > 1]
    if len(varying) != 1:
        raise UnsupportedLayer(step, "its threshold varies along more than one axis; MultiThreshold takes one")
    return flat.reshape(-1, 1), _layout(rank, varying[0])


@dataclass
class QonnxGraph:
    """Rewrites ``graph`` in place (``lower``); collects qonnx datatypes, summary rows and notes."""

    graph: ir.Graph
    datatypes: dict[str, str] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lower(self) -> None:
        for node in list(self.graph):
            if is_step(node):
                self._step(node)
            elif node.domain == DOMAIN and node.op_type == OP:
                self._binary(node)
        self._weights()

    def _const(self, name: str, array) -> ir.Value:
        return replacing_initializer(self.graph, name, np.asarray(array))

    def _step_node(self, x: ir.Value, theta: np.ndarray, tie: str, levels: str, name: str) -> tuple[ir.Node, str]:
        """BipolarQuant for a ±1 sign at 0 (tie ge), else a one-threshold MultiThreshold; and the summary text."""
        theta = theta.astype(np.float32)
        if levels == "pm1" and tie == "ge" and not np.any(theta):
            return _qonnx("BipolarQuant", [x, self._const("htaf.qonnx.one", np.ones(1, np.float32))],
                          name=f"{name}/quant"), "BipolarQuant"
        moved = tie == "gt"
        if moved:  # x > θ ⟺ x >= next float32 above θ, for float32 x
            theta = np.nextafter(theta, np.float32(np.inf), dtype=np.float32)
        rows, layout = threshold_rows(theta, _rank(x), name)
        dtype, scale, bias = STEP_FORMS[levels]
        attributes = {"out_dtype": dtype, "out_scale": scale, "out_bias": bias}
        if layout:
            attributes["data_layout"] = layout
        node = _qonnx("MultiThreshold", [x, self._const(f"{name}.thresholds", rows)], attributes, f"{name}/threshold")
        return node, "MultiThreshold" + (" (tie gt: threshold moved to the next float32 up)" if moved else "")

    def _step(self, node: ir.Node) -> None:
        name = str(node.outputs[0].name)
        theta = const_array(node.inputs[1])
        if theta is None:
            raise UnsupportedLayer(name, "its threshold is computed at run time; MultiThreshold needs constants")
        levels = "pm1" if node.op_type == "Sign" else "01"
        new, became = self._step_node(node.inputs[0], theta, node.attributes["tie"].as_string(), levels, name)
        self._replace(node, [new], new.outputs[0])
        self.datatypes[name] = STEP_FORMS[levels][0]
        self.rows.append((name, became, f"{node.op_type}, tie {node.attributes['tie'].as_string()}"))

    def _binary(self, node: ir.Node) -> None:
        layer: BinaryLayer = node.meta["binary"]
        name = f"{layer.name}/qonnx"
        out = str(node.outputs[0].name)
        if layer.mode == "affine" and not layer.chained:  # as Brevitas writes a quantized layer: scale, bias inside
            nodes, y = self._product(layer, node.inputs[0], name, brevitas=True)
            self._replace(node, nodes, y)
            self.rows.append((layer.name, "BipolarQuant weights + " + nodes[-1].op_type, "as Brevitas exports it"))
            return
        nodes, acc = self._product(layer, node.inputs[0], name)
        if layer.mode == "threshold":
            levels = layer.levels or "pm1"
            dtype, scale, bias = STEP_FORMS[levels]
            thresholds = self._const(f"{layer.name}.thresholds", layer.threshold.astype(np.float32).reshape(-1, 1))  # type: ignore[union-attr]
            layout = LAYOUTS[4] if layer.kind == "conv" else _layout(_rank(node.inputs[0]) or 2, (_rank(node.inputs[0]) or 2) - 1)
            step = _qonnx("MultiThreshold", [acc, thresholds], {"out_dtype": dtype, "out_scale": scale, "out_bias": bias,
                                                                 "data_layout": layout}, f"{name}/threshold")
            self._replace(node, nodes + [step], step.outputs[0])
            self.datatypes[out] = dtype
            self.rows.append((layer.name, f"BipolarQuant weights + {nodes[-1].op_type} + MultiThreshold",
                              "; ".join(layer.notes) or "integer thresholds"))
            return
        tail, y = per_channel_tail(self.graph, layer, acc, name)
        self._replace(node, nodes + tail, y)
        self.rows.append((layer.name, f"BipolarQuant weights + {nodes[-1].op_type}", "exact integer sums, then the float affine"))

    def _product(self, layer: BinaryLayer, x: ir.Value, name: str, brevitas: bool = False
                 ) -> tuple[list[ir.Node], ir.Value]:
        """Conv / Gemm (2-D input) / MatMul of the layer's ±1 weights (flip folded in) behind a BipolarQuant: the
        integer sums. ``brevitas``: the weight scale in the BipolarQuant and the bias in the conv/Gemm instead."""
        weight = layer.folded_weight() if layer.mode == "threshold" else layer.weight
        scale, bias = np.ones(1, np.float32), None
        if brevitas:
            bias = layer.shift if layer.scale is not None else layer.bias
            if layer.weight_scale is not None:
                ws = layer.weight_scale.astype(np.float32)
                scale = ws[:1] if np.all(ws == ws[0]) else ws.reshape((-1,) + (1,) * (weight.ndim - 1))
        gemm = layer.kind == "dense" and _rank(x) == 2
        if layer.kind == "dense" and not gemm:
            weight, scale = np.ascontiguousarray(weight.T), scale.reshape(1, -1) if scale.size > 1 else scale
        quant = _qonnx("BipolarQuant", [self._const(f"{layer.name}.weight", weight.astype(np.float32)),
                                        self._const(f"{layer.name}.weight_scale", scale)], name=f"{name}/weight_quant")
        quant.outputs[0].name = f"{layer.name}.weight_bipolar"
        if scale.size == 1 and scale[0] == 1.0:
            self.datatypes[f"{layer.name}.weight_bipolar"] = "BIPOLAR"
        bias_v = [self._const(f"{layer.name}.bias", bias.astype(np.float32))] if bias is not None else []
        nodes = [quant]
        if gemm:
            product = ir.node("Gemm", [x, quant.outputs[0], *bias_v], {"transB": 1}, name=f"{name}/gemm")
        elif layer.kind == "dense":
            product = ir.node("MatMul", [x, quant.outputs[0]], name=f"{name}/matmul")
            if bias_v:
                nodes.append(product)
                product = ir.node("Add", [product.outputs[0], *bias_v], name=f"{name}/bias")
        else:
            pad_nodes, x, pads = padding(self.graph, layer, x, np.float32(layer.padding.value if layer.padding else 0.0),
                                         layer.name)
            nodes += pad_nodes
            product = ir.node("Conv", [x, quant.outputs[0], *bias_v], {"strides": list(layer.stride), "pads": pads,
                                                                        "dilations": list(layer.dilation),
                                                                        "group": layer.group}, name=f"{name}/conv")
        if not brevitas:
            product.outputs[0].name = f"{layer.name}.sum"
            self.datatypes[f"{layer.name}.sum"] = f"INT{int(np.ceil(np.log2(layer.fan_in + 1))) + 1}"
        return nodes + [product], product.outputs[0]

    def _replace(self, node: ir.Node, nodes: list[ir.Node], y: ir.Value) -> None:
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], nodes, [node.outputs[0]], [y])

    def _weights(self) -> None:
        """±1 (or ±scale per channel) weights of the remaining float layers behind a BipolarQuant, as Brevitas."""
        for node in list(self.graph):
            index = WEIGHT_INPUTS.get(node.op_type) if node.domain == "" else None
            weight = node.inputs[index] if index is not None and len(node.inputs) > index else None
            array = const_array(weight)
            if weight is None or array is None or array.ndim < 2 or array.size < 2 * array.shape[channel_axis(node, array.ndim)]:
                continue  # one weight per channel is a scale, not a binary layer
            axis = channel_axis(node, array.ndim)
            factor = sign_factor(array, axis)
            if factor is None:
                continue
            signs, scale = factor
            shape = [1] * array.ndim
            shape[axis] = -1
            scale_v = self._const(f"{weight.name}.scale", np.ones(1, np.float32) if scale is None else scale.reshape(shape))
            quant = _qonnx("BipolarQuant", [self._const(f"{weight.name}.signs", signs), scale_v],
                           name=f"{weight.name}/quant")
            quant.outputs[0].name = f"{weight.name}.bipolar"
            self.graph.insert_before(node, [quant])
            node.replace_input_with(index, quant.outputs[0])
            if scale is None:
                self.datatypes[str(quant.outputs[0].name)] = "BIPOLAR"
