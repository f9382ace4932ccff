"""One binary layer as the integer ops that stock ONNX Runtime runs on its fast u8×s8 kernels.

Which ops, measured (``benchmarks/bench_int8.py``; one 3×3 conv of 256 channels on 28×28, 1 thread): float
``Conv`` 3.6 ms; ``QLinearConv`` with a uint8 input and int8 weights 0.93 ms; ``MatMulInteger`` with uint8
activations on the left and constant int8 weights on the right (im2col, channels last) 1.0 ms; u8×u8
``ConvInteger`` 2.6 ms; s8×u8 ``MatMulInteger`` 20 ms (docs/integer-targets.md). Operand types decide whether
the fast kernel runs, so every layer here has uint8 activations and int8 weights.

- **Threshold layers** (the layer ends in a step, "fires iff flip·v ≥ T", see ``tflite_binary``): the conv is
  ``QLinearConv`` with every scale 1, input zero point z (1 for ±1 stored as {0, 2}, 0 for {0, 1}), weights
  flip·W in int8, bias −T in int32 and output zero point 128: the output is sat(flip·v − T + 128), and
  saturation keeps the sign, so the step is output ≥ 128, exactly, for every tie rule (the threshold is an
  integer). A dense layer is ``MatMulInteger`` → int32 v, compared with T.
- **Affine layers** (a float op follows: the classifier, a residual sum): the exact integer v is
  ``MatMulInteger`` (dense; convs through im2col, channels last: one strided ``Slice`` per kernel position, a
  ``Concat`` and one product whose constant right operand ONNX Runtime prepacks), then the per-channel
  y = scale·v + shift in float.
- Anything else (grouped affine convs, a pad value no level encodes) runs as the float conv the ONNX target
  writes, on the float activations: exact, only slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from htaf_export.passes.util import replacing_initializer

from .layer_ops import padding, per_channel_tail
from .tflite_binary import BinaryLayer

OUTPUT_ZERO_POINT = 128  # the output of a threshold conv: ≥ 128 ⟺ the step fires


@dataclass(frozen=True)
class Encoding:
    """How step activations of ``levels`` ("pm1" or "01") are stored as uint8: ±1 as {0, 2} with zero point 1,
    {0, 1} as itself with zero point 0. Activations are the uint8 operand of every product."""

    levels: str

    @property
    def zero_point(self) -> int:
        return 1 if self.levels == "pm1" else 0

    def stores(self, real: float) -> bool:
        allowed = (-1.0, 0.0, 1.0) if self.levels == "pm1" else (0.0, 1.0)
        return real in allowed

    def of(self, real: float) -> np.ndarray:
        return np.array(int(real) + self.zero_point, np.uint8)

    def fired_values(self) -> tuple[np.ndarray, np.ndarray]:
        """(value when fired, value when not)."""
        return self.of(1.0), self.of(-1.0 if self.levels == "pm1" else 0.0)


def _const(graph: ir.Graph, name: str, array) -> ir.Value:
    return replacing_initializer(graph, name, np.asarray(array))


def float_reason(layer: BinaryLayer, levels: str) -> str:
    """Why the layer runs as a float conv on float activations instead of integer ops; "" when it need not."""
    pad = layer.padding
    if pad is not None and pad.any and not Encoding(levels).stores(pad.value):
        return f"padding {levels} activations with {pad.value:g}: no uint8 code for it"
    if layer.kind == "conv" and layer.mode == "affine" and layer.group != 1:
        return "grouped convs with a float output run as float convs"
    return ""


def threshold_conv(graph: ir.Graph, layer: BinaryLayer, x: ir.Value, enc: Encoding, name: str
                   ) -> tuple[list[ir.Node], ir.Value]:
    """→ (nodes, bool "fired") for a conv in threshold mode (QLinearConv, module docstring)."""
    # QLinearConv pads with the zero point, the real 0; other pad values are an explicit uint8 Pad
    nodes, x, pads = padding(graph, layer, x, enc.of(layer.padding.value if layer.padding else 0.0), name)
    one = _const(graph, "htaf.int8.one", np.array(1.0, np.float32))
    inputs = [x, one, _const(graph, f"{name}.x_zero_point", enc.of(0.0)),
              _const(graph, f"{layer.name}.weight", layer.folded_weight().astype(np.int8)), one,
              _const(graph, "htaf.int8.zero_s8", np.array(0, np.int8)), one,
              _const(graph, "htaf.int8.y_zero_point", np.array(OUTPUT_ZERO_POINT, np.uint8)),
              _const(graph, f"{layer.name}.bias", (-layer.threshold).astype(np.int32))]  # type: ignore[operator]
    conv = ir.node("QLinearConv", inputs, {"strides": list(layer.stride), "pads": pads,
                                           "dilations": list(layer.dilation), "group": layer.group},
                   name=f"{name}/qconv")
    fired = ir.node("GreaterOrEqual", [conv.outputs[0], inputs[7]], name=f"{name}/fired")
    return nodes + [conv, fired], fired.outputs[0]


def _dense_product(graph: ir.Graph, layer: BinaryLayer, x: ir.Value, enc: Encoding, name: str) -> ir.Node:
    weight = layer.folded_weight() if layer.mode == "threshold" else layer.weight
    return ir.node("MatMulInteger", [x, _const(graph, f"{layer.name}.weight", np.ascontiguousarray(weight.T).astype(np.int8)),
                                     _const(graph, f"{name}.x_zero_point", enc.of(0.0)),
                                     _const(graph, "htaf.int8.zero_s8", np.array(0, np.int8))], name=f"{name}/matmul")


def threshold_dense(graph: ir.Graph, layer: BinaryLayer, x: ir.Value, enc: Encoding, name: str
                    ) -> tuple[list[ir.Node], ir.Value]:
    """→ (nodes, bool "fired"): int32 v from MatMulInteger, compared with the integer thresholds."""
    product = _dense_product(graph, layer, x, enc, name)
    threshold = _const(graph, f"{layer.name}.threshold", layer.threshold.astype(np.int32))  # type: ignore[union-attr]
    fired = ir.node("GreaterOrEqual", [product.outputs[0], threshold], name=f"{name}/fired")
    return [product, fired], fired.outputs[0]


def _im2col_conv(graph: ir.Graph, layer: BinaryLayer, x: ir.Value, enc: Encoding, name: str
                 ) -> tuple[list[ir.Node], ir.Value]:
    """int32 v of an ungrouped conv, channels last: one strided slice per kernel position, concatenated on
    channels, times the constant [kh·kw·in, out] int8 matrix on the right (the operand ONNX Runtime prepacks).
    Each tap ends where the last kernel row would, counted from the end, so no input size is needed."""
    to_nhwc = ir.node("Transpose", [x], {"perm": [0, 2, 3, 1]}, name=f"{name}/to_nhwc")
    pad_nodes, x, _ = padding(graph, layer, to_nhwc.outputs[0], enc.of(layer.padding.value if layer.padding else 0.0),
                              name, zero_in_conv=False, channels_last=True)
    nodes: list[ir.Node] = [to_nhwc, *pad_nodes]
    out_c, in_c, kh, kw = layer.weight.shape
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    axes = _const(graph, "htaf.int8.nhwc_axes", np.array([1, 2], np.int64))
    steps = _const(graph, f"{name}.steps", np.array([sh, sw], np.int64))
    slices = []
    for i in range(kh):
        for j in range(kw):
            start = _const(graph, f"{name}.start{i}_{j}", np.array([i * dh, j * dw], np.int64))
            end = _const(graph, f"{name}.end{i}_{j}", np.array([_end(kh, i, dh), _end(kw, j, dw)], np.int64))
            slices.append(ir.node("Slice", [x, start, end, axes, steps], name=f"{name}/tap{i}_{j}"))
    column = ir.node("Concat", [s.outputs[0] for s in slices], {"axis": 3}, name=f"{name}/columns")
    matrix = layer.weight.transpose(2, 3, 1, 0).reshape(-1, out_c).astype(np.int8)
    product = ir.node("MatMulInteger", [column.outputs[0], _const(graph, f"{layer.name}.weight", matrix),
                                        _const(graph, f"{name}.x_zero_point", enc.of(0.0)),
                                        _const(graph, "htaf.int8.zero_s8", np.array(0, np.int8))], name=f"{name}/matmul")
    to_nchw = ir.node("Transpose", [product.outputs[0]], {"perm": [0, 3, 1, 2]}, name=f"{name}/to_nchw")
    return nodes + slices + [column, product, to_nchw], to_nchw.outputs[0]


def _end(kernel: int, tap: int, dilation: int) -> int:
    """Slice end of kernel position ``tap``: as many rows before the end as the later taps span."""
    behind = (kernel - 1 - tap) * dilation
    return -behind if behind else np.iinfo(np.int64).max


def affine_integer(graph: ir.Graph, layer: BinaryLayer, x: ir.Value, enc: Encoding, name: str
                   ) -> tuple[list[ir.Node], ir.Value]:
    """→ (nodes, float y): the exact int32 v, then y = scale·v + shift per channel."""
    if layer.kind == "dense":
        product = _dense_product(graph, layer, x, enc, name)
        nodes, acc = [product], product.outputs[0]
    else:
        nodes, acc = _im2col_conv(graph, layer, x, enc, name)
    as_float = ir.node("Cast", [acc], {"to": ir.DataType.FLOAT}, name=f"{name}/to_float")
    tail, y = per_channel_tail(graph, layer, as_float.outputs[0], name)
    return nodes + [as_float] + tail, y
