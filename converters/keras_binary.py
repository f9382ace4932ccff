"""The Keras layers of steps and of fused binary layers (see ``tflite_binary``): larq ``QuantConv2D`` where LCE
bit-packs the layer exactly, a float conv otherwise; integer thresholds as a never-zero pre-sign."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer
from htaf_export.passes.util import const_array

from .keras_builder import EmittedLayer, KerasBuilder, Presign, Val, keras, larq_module, tf
from .keras_shapes import per_position, positions
from .lce_plan import FLOAT_PLAN, LcePlan, plan_lce
from .tflite_binary import BinaryLayer, with_input_size


def step(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """htaf.Heaviside / htaf.Sign: x ≥ t (x > t for tie gt). In bit-packed builds a Sign stays pre-sign,
    y = x − t, for the next binary layer's quantizer: x − t ≥ 0 ⇔ x ≥ t exactly in IEEE arithmetic."""
    x = b.materialize(b.get(node.inputs[0]))
    threshold = const_array(node.inputs[1])
    tie = node.attributes["tie"].as_string()
    levels = "pm1" if node.op_type == "Sign" else "01"
    if x.tensor is None and x.const is not None and threshold is not None:
        # a step of a constant (snnTorch's reset reads the zero initial membrane): a constant, folded here
        fired = np.asarray(x.const > threshold if tie == "gt" else x.const >= threshold, np.float32)
        return [Val(const=fired if levels == "01" else 2 * fired - 1)]
    if x.tensor is None or threshold is None:
        raise UnsupportedLayer(node.name, "step with a computed threshold")
    t = b.const_like(threshold, x)
    name = node.outputs[0].name or node.name
    if b.bitpacked and levels == "pm1":
        minus_t = -t  # x + (−t) is x − t exactly, and an ADD folds into the conv bias before it
        y = x.tensor if not np.any(t) else b.lam(lambda z: z + minus_t, x.tensor, f"{name}_minus_threshold")
        return [b.record_step(name, replace(x, tensor=y, presign=Presign(levels, tie)))]

    def step(z):
        fired = tf.greater(z, t) if tie == "gt" else tf.greater_equal(z, t)
        return tf.cast(fired, tf.float32) if levels == "01" else tf.where(fired, 1.0, -1.0)

    return [b.record_step(name, replace(x, tensor=b.lam(step, x.tensor, name)))]


def binary(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """A fused binary layer (see tflite_binary): larq QuantConv2D when LCE can bit-pack it, else a float conv."""
    layer: BinaryLayer = node.meta["binary"]
    x = b.get(node.inputs[0])
    weight, bias = layer.folded_weight(), layer.folded_bias()
    rows = positions(b, x) if layer.kind == "dense" else None
    if layer.kind == "dense":
        plan = plan_lce(layer) if b.bitpacked else FLOAT_PLAN
        if plan.packed:
            y, kind = b.dense_as_conv(rows or x, weight, bias, layer.name, quantizer=b.quantizer(x))
        elif layer.scale is not None or rows:  # as a conv, so that the depthwise op below applies to its output
            y, kind = b.dense_as_conv(b.materialize(rows or x), weight, bias, layer.name)
        else:
            y, kind = b.dense(b.materialize(x), weight, bias, layer.name)
    else:
        x = b.to_canonical(x)
        if layer.input_hw is None:  # a traced program's IR may not know the input size; Keras does
            layer = with_input_size(layer, x.shape[1:3])  # type: ignore[arg-type]
        plan = plan_lce(layer) if b.bitpacked else FLOAT_PLAN
        y, kind = _binary_conv(b, layer, plan, x, weight, bias)
    b.layers.append(EmittedLayer(layer.name, kind, True, int(layer.weight.size), binary=layer, lce=plan))
    if layer.mode != "threshold":
        if layer.scale is not None:
            # y = scale·v + shift as a 1×1 depthwise conv: LCE does not fold it into the binary op (see tflite_binary)
            make = lambda: keras.layers.DepthwiseConv2D(1, use_bias=True, name=b.name(f"{layer.name}_affine"))  # noqa: E731
            y = replace(y, tensor=b.apply(make, y.tensor, [layer.scale.reshape(1, 1, -1, 1), layer.shift],
                                          f"affine:{layer.name}"))
        return [per_position(b, y, x) if rows else y]
    # y = flip·v − T + ½ is never 0 and its sign is the step (see tflite_binary).
    presign = replace(y, presign=Presign(layer.levels or "pm1", "ge"))
    out = presign if (b.bitpacked and layer.levels == "pm1") else b.materialize(presign)
    return [b.record_step(layer.step or node.outputs[0].name, per_position(b, out, x) if rows else out)]


def _binary_conv(b: KerasBuilder, layer: BinaryLayer, plan: LcePlan, x: Val, weight: np.ndarray,
                 bias) -> tuple[Val, str]:
    pad = layer.padding
    out_shape: tuple[int, ...]
    if plan.packed:
        t, padding, pad_values = x.tensor, "valid", 0.0
        if plan.padding == "same" and pad is not None:
            padding, pad_values = "same", pad.value
        elif plan.padding == "explicit" and pad is not None:  # ±1 padding commutes with the quantizer
            t = b.pad_nhwc(t, pad.top, pad.bottom, pad.left, pad.right, pad.value, f"{layer.name}_pad")
        quantizer = b.quantizer(x)
        make = lambda: larq_module().layers.QuantConv2D(  # noqa: E731
            weight.shape[0], weight.shape[2:], strides=layer.stride, padding=padding, pad_values=pad_values,
            dilation_rate=layer.dilation,
            input_quantizer=quantizer, kernel_quantizer=None, use_bias=bias is not None, name=b.name(layer.name))
        y = b.apply(make, t, [weight.transpose(2, 3, 1, 0)] + ([bias] if bias is not None else []),
                    f"QuantConv2D:{layer.name}:{padding}:{pad_values}:{quantizer}")
        kind = "QuantConv2D"
    else:
        x = b.materialize(x)
        t = x.tensor
        if pad is not None and pad.any:
            t = b.pad_nhwc(t, pad.top, pad.bottom, pad.left, pad.right, pad.value, f"{layer.name}_pad")
        y, kind = b.conv2d(t, weight, bias, layer.stride, layer.group, layer.name, layer.dilation)
    out_shape = tuple(int(d) for d in y.shape[1:])
    h, w, c = out_shape
    return Val(y, (c, h, w), "nhwc"), kind
