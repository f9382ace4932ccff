"""Small pieces the converters share: the fused IR they start from, a binary layer's padding and per-channel tail."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import fold_constants

from htaf_export.capture import Capture
from htaf_export.passes import FoldBatchNormIntoSteps
from htaf_export.passes.util import replacing_initializer

from .batch_transposes import dissolve_batch_transposes
from .lift_1d import lift_one_dimensional
from .tflite_binary import LCE_LEVELS, BinaryLayer, FuseBinaryLayers

SHAPE_ARITHMETIC = ("ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Gather", "Squeeze",
                    "Unsqueeze", "Range")


def fold_shape_arithmetic(model: ir.Model) -> None:
    """Shape arithmetic on constants (TorchScript's computed Pad widths) becomes constants, so that the binary
    layer patterns see constant pads; the default folding rules leave such ops alone."""
    fold_constants(model, should_fold=lambda n: True if n.domain == "" and n.op_type in SHAPE_ARITHMETIC else None)


def fused_ir(capture: Capture, bitpacked: bool = True, levels: tuple[str, ...] = LCE_LEVELS, two_d: bool = False
             ) -> tuple[ir.Model, tuple[tuple[str, str], ...]]:
    """A copy of the IR with its binary layers fused (``tflite_binary``) and the other batch norms folded into step
    thresholds, and the ±1 layers left as they were with why: what every target with binary layers starts from.
    ``two_d``: for the Keras targets: 1-D convolutions and pools as height-1 2-D ones first (``lift_1d``), and no
    transpose that moves the batch where a time loop reads it (``batch_transposes``)."""
    model = capture.ir_copy()  # converters never modify the shared IR
    fold_shape_arithmetic(model)
    if two_d:
        dissolve_batch_transposes(model)
        lift_one_dimensional(model)
    refusals = FuseBinaryLayers(bitpacked, levels)(model).refusals
    FoldBatchNormIntoSteps()(model)
    return model, refusals


def padding(graph: ir.Graph, layer: BinaryLayer, x: ir.Value, value: np.ndarray, name: str, *, zero_in_conv: bool = True,
            channels_last: bool = False) -> tuple[list[ir.Node], ir.Value, list[int]]:
    """(nodes, padded input, the conv's ``pads``): zero padding left to the conv when ``zero_in_conv`` (it pads with
    the zero point, the real 0), any other as an explicit ``Pad`` of ``value`` (the pad value in the input's
    encoding) before it."""
    pad = layer.padding
    if pad is None or not pad.any:
        return [], x, [0, 0, 0, 0]
    if pad.value == 0.0 and zero_in_conv:
        return [], x, [pad.top, pad.left, pad.bottom, pad.right]
    widths = [0, pad.top, pad.left, 0, 0, pad.bottom, pad.right, 0] if channels_last else \
        [0, 0, pad.top, pad.left, 0, 0, pad.bottom, pad.right]
    spec = replacing_initializer(graph, f"{name}.pads", np.array(widths, np.int64))
    node = ir.node("Pad", [x, spec, replacing_initializer(graph, f"{name}.pad_value", value)], {"mode": "constant"},
                   name=f"{name}/pad")
    return [node], node.outputs[0], [0, 0, 0, 0]


def per_channel_tail(graph: ir.Graph, layer: BinaryLayer, v: ir.Value, name: str) -> tuple[list[ir.Node], ir.Value]:
    """y = scale·v + shift (or v + bias) per output channel, in float: an affine-mode layer after its sums."""
    shape = (-1, 1, 1) if layer.kind == "conv" else (-1,)
    scale, shift = (layer.scale, layer.shift) if layer.scale is not None else (None, layer.bias)
    nodes: list[ir.Node] = []
    for op, array, what in (("Mul", scale, "scale"), ("Add", shift, "shift")):
        if array is not None:
            constant = replacing_initializer(graph, f"{layer.name}.{what}", array.astype(np.float32).reshape(shape))
            nodes.append(ir.node(op, [v, constant], name=f"{name}/{what}"))
            v = nodes[-1].outputs[0]
    return nodes, v
