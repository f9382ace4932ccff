"""One small function per IR op, each emitting the Keras layers for it on a :class:`KerasBuilder`.

``EMITTERS`` maps (domain, op type) to its function; a node with no entry is refused, naming the op.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer
from htaf_export.ops import HTAF_DOMAIN
from htaf_export.passes.util import attr, const_array, zeros_among_signs

from .keras_binary import binary, step
from .keras_decisions import DECISION_EMITTERS, tensor_pair
from .keras_builder import NHWC_AXIS, SHAPE_OPS, EmittedLayer, KerasBuilder, Val, keras, tf
from .keras_activations import FORMULAS, activation, erf
from .keras_norms import instance_norm, layer_norm
from .keras_padding import pad
from .keras_transposed import conv_transpose
from .keras_products import activation_product
from .keras_shapes import expand, identity, per_position, positions, reshape, shape_only, split, tile, transpose
from .keras_upsampling import depth_to_space, resize
from .layouts import torch_shape
from .tflite_binary import DOMAIN as BINARY_DOMAIN, OP as BINARY_OP, is_binary_weight, layer_name, trim_padding


# ---- one function per IR op ----------------------------------------------------------------------


UNARY_OPS = {"Relu": tf.nn.relu, "Sigmoid": tf.math.sigmoid, "Tanh": tf.math.tanh, "Neg": tf.math.negative,
             "Abs": tf.math.abs, "Exp": tf.math.exp, "Log": tf.math.log, "Sqrt": tf.math.sqrt,
             "Sign": tf.math.sign}


def _unary(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.real(node.inputs[0])
    return [replace(x, tensor=b.lam(UNARY_OPS[node.op_type], x.tensor, node.name or node.op_type))]


# Python operators work on numpy constants and on TF tensors alike (true division for floats).
BINARY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "Add": lambda a, c: a + c, "Sub": lambda a, c: a - c, "Mul": lambda a, c: a * c, "Div": lambda a, c: a / c,
    "Max": lambda a, c: tf.maximum(a, c), "Min": lambda a, c: tf.minimum(a, c), "Pow": lambda a, c: a ** c}


def _elementwise(b: KerasBuilder, node: ir.Node) -> list[Val]:
    op = BINARY_OPS[node.op_type]
    if len(node.inputs) != 2:
        raise UnsupportedLayer(node.name, f"{node.op_type} of {len(node.inputs)} inputs")
    a, c = b.get(node.inputs[0]), b.get(node.inputs[1])
    if a.tensor is None and c.tensor is None:
        if a.const is None or c.const is None:
            raise UnsupportedLayer(node.name, "shape arithmetic in an elementwise op")
        result = np.asarray(op(a.const.astype(np.float32), c.const.astype(np.float32)), dtype=np.float32)
        return [Val(const=result, shape=result.shape)]
    if a.tensor is not None and c.tensor is not None:
        return tensor_pair(b, node, a, c, op)
    tensor_first = a.tensor is not None
    x = b.materialize(a if tensor_first else c)
    k = (c if tensor_first else a).const
    if tuple(np.broadcast_shapes((1,) + x.shape, k.shape)[1:]) != x.shape:  # type: ignore[union-attr]
        raise UnsupportedLayer(node.name, f"{node.op_type} broadcasts {x.shape} with a constant of {k.shape}")  # type: ignore[union-attr]
    kc = b.const_like(k, x)  # type: ignore[arg-type]
    fn = (lambda z: op(z, kc)) if tensor_first else (lambda z: op(kc, z))
    return [replace(x, tensor=b.lam(fn, x.tensor, node.name or node.op_type))]


def _clip(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """clamp / hardtanh / relu6: Clip with constant bounds (absent bounds are ±infinity)."""
    x = b.real(node.inputs[0])
    bounds = []
    for k, default in ((1, -np.inf), (2, np.inf)):
        value = node.inputs[k] if len(node.inputs) > k else None
        array = const_array(value) if value is not None else np.array(default)
        if array is None or array.size != 1:
            raise UnsupportedLayer(node.name, "Clip with bounds computed at run time")
        bounds.append(float(array.reshape(())))
    lo, hi = bounds
    return [replace(x, tensor=b.lam(lambda z: tf.clip_by_value(z, lo, hi), x.tensor, node.name or "clip"))]


def _leaky_relu(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.real(node.inputs[0])
    alpha = float(attr(node, "alpha", 0.01))
    return [replace(x, tensor=b.lam(lambda z: tf.nn.leaky_relu(z, alpha), x.tensor, node.name or "leaky_relu"))]


def _prelu(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """nn.PReLU (one slope, or one per channel; RPReLU in ReActNet): x where x ≥ 0, else slope·x (exact)."""
    x = b.to_canonical(b.real(node.inputs[0]))
    slope = const_array(node.inputs[1])
    if slope is None:
        raise UnsupportedLayer(node.name, "PRelu with a slope computed at run time")
    s = b.const_like(slope, x)
    return [replace(x, tensor=b.lam(lambda z: tf.where(z >= 0, z, z * s), x.tensor, node.name or "prelu"))]


def _softmax(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """Softmax / LogSoftmax over one axis of the PyTorch tensor, applied where that axis is stored."""
    x = b.to_canonical(b.real(node.inputs[0]))
    rank = len(x.shape) + 1
    axis = int(attr(node, "axis", -1)) % rank
    if axis == 0:
        raise UnsupportedLayer(node.name, f"{node.op_type} over the batch")
    stored = NHWC_AXIS[axis] if x.layout == "nhwc" else axis
    fn = tf.nn.softmax if node.op_type == "Softmax" else tf.nn.log_softmax
    return [replace(x, tensor=b.lam(lambda z: fn(z, axis=stored), x.tensor, node.name or node.op_type))]


def _conv(b: KerasBuilder, node: ir.Node) -> list[Val]:
    name = layer_name(node)
    weight = const_array(node.inputs[1])
    if weight is None:
        raise UnsupportedLayer(name, "its weights are computed at run time; the TFLite targets need constant weights")
    if weight.ndim == 3:  # lift_1d made every other 1-D convolution a height-1 2-D one
        raise UnsupportedLayer(name, "a 1-D convolution with auto_pad: export it with explicit padding, or use "
                               "--target onnx")
    if weight.ndim != 4:
        raise UnsupportedLayer(name, f"a {weight.ndim - 2}-D convolution: the TFLite targets convert 1-D and 2-D ones "
                               "only; --target onnx or onnx-int8 take it")
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedLayer(name, "auto_pad is not supported")
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    x = b.to_canonical(b.real(node.inputs[0]))
    top, left, bottom, right = (int(p) for p in attr(node, "pads", [0, 0, 0, 0]))
    stride, dilation = tuple(attr(node, "strides", [1, 1])), tuple(attr(node, "dilations", [1, 1]))
    _, h, w = x.shape
    bottom = trim_padding(h, weight.shape[2], stride[0], top, bottom, dilation[0])
    right = trim_padding(w, weight.shape[3], stride[1], left, right, dilation[1])
    t = x.tensor
    if top or left or bottom or right:
        t = keras.layers.ZeroPadding2D(((top, bottom), (left, right)), name=b.name(f"{name}_pad"))(t)
    y, kind = b.conv2d(t, weight, bias, stride, int(attr(node, "group", 1)), name, dilation)
    binary, zeros = is_binary_weight(weight), zeros_among_signs(weight)
    note = "input is real-valued; LCE packs ±1 inputs only" if binary and b.bitpacked else (
        f"{zeros:,} weights are exactly 0 (sign(0) = 0): not binary; binarize with where(w >= 0, 1, -1)" if zeros else "")
    b.layers.append(EmittedLayer(name, kind, binary, int(weight.size), note))
    return [Val(y, torch_shape(y, "nhwc"), "nhwc")]


def _gemm(b: KerasBuilder, node: ir.Node) -> list[Val]:
    name = layer_name(node)
    weight = const_array(node.inputs[1])
    if weight is None:
        return activation_product(b, node, name)
    if weight.ndim != 2:
        raise UnsupportedLayer(name, "only dense layers with constant 2-D weights are supported")
    if node.op_type == "Gemm":
        if int(attr(node, "transA", 0)):
            raise UnsupportedLayer(name, "Gemm with transA")
        weight = weight if int(attr(node, "transB", 0)) else weight.T
        weight = weight * np.float32(attr(node, "alpha", 1.0)) if float(attr(node, "alpha", 1.0)) != 1.0 else weight
    else:
        weight = weight.T
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if bias is not None and float(attr(node, "beta", 1.0)) != 1.0:
        bias = bias * np.float32(attr(node, "beta", 1.0))
    if bias is not None and bias.size != weight.shape[0]:
        raise UnsupportedLayer(name, f"bias of shape {bias.shape} for {weight.shape[0]} outputs")
    held = b.get(node.inputs[0])
    if held.tensor is None and held.const is not None and np.ndim(held.const) == 2:
        # on a batch-broadcast constant (a recurrent layer reading its zero initial state): folded here
        product = np.asarray(held.const, np.float32) @ weight.T.astype(np.float32)
        return [Val(const=product + bias.astype(np.float32) if bias is not None else product)]
    x = b.real(node.inputs[0])
    binary = is_binary_weight(weight)
    rows, note = positions(b, x), ""  # [N, L, F]: a layer at each position (a per-time-step head), as a 1×1 conv
    if rows is not None:
        y, kind = b.dense_as_conv(rows, weight, bias, name)
        y = per_position(b, y, x)
    elif b.bitpacked and binary:  # keep BNN graphs free of FULLY_CONNECTED; a float 1×1 conv holds the same weights
        y, kind = b.dense_as_conv(x, weight, bias, name)
        note = "input is real-valued; LCE packs ±1 inputs only (a float conv, no FULLY_CONNECTED)"
    else:
        y, kind = b.dense(x, weight, bias, name)
    b.layers.append(EmittedLayer(name, kind, binary, int(weight.size), note))
    return [y]


def _batchnorm(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.real(node.inputs[0])
    if x.layout == "nhwc_flat":
        x = b.to_plain(x)
    x = b.to_canonical(x) if x.layout == "plain" else x
    if x.layout == "plain" and len(x.shape) != 1:  # channels (axis 1) must be the last stored axis
        raise UnsupportedLayer(node.name, f"batch norm over a {len(x.shape) + 1}-D tensor")
    params = [const_array(v) for v in node.inputs[1:5]]
    if any(p is None for p in params):
        raise UnsupportedLayer(node.name, "batch norm with computed parameters")
    layer = keras.layers.BatchNormalization(axis=-1, epsilon=float(attr(node, "epsilon", 1e-5)),
                                              name=b.name(node.name or "batchnorm"))
    y = layer(x.tensor)
    layer.set_weights([p.astype(np.float32) for p in params])  # type: ignore[union-attr]
    return [replace(x, tensor=y)]


def _pool_geometry(node: ir.Node, hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], list[int], tuple[int, int]]:
    """(kernel, strides, [top, bottom, left, right] padding, output size) of a pooling node, PyTorch's rules: with
    ceil_mode the last window may hang past the end (the extra rows padded here), but must start inside the
    input or its left padding."""
    kernel = tuple(int(k) for k in attr(node, "kernel_shape", [1, 1]))
    strides = tuple(int(v) for v in attr(node, "strides", kernel))
    top, left, bottom, right = (int(p) for p in attr(node, "pads", [0, 0, 0, 0]))
    pads, out = [top, bottom, left, right], []
    for axis, (size, k, st, before) in enumerate(zip(hw, kernel, strides, (top, left))):
        after = pads[2 * axis + 1]
        span = size + before + after - k
        n = (-(-span // st) if int(attr(node, "ceil_mode", 0)) else span // st) + 1
        if (n - 1) * st >= size + before:
            n -= 1
        pads[2 * axis + 1] = max(after, (n - 1) * st + k - size - before)
        out.append(n)
    return kernel, strides, pads, (out[0], out[1])  # type: ignore[return-value]


def _maxpool(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.to_canonical(b.get(node.inputs[0]))  # pre-sign values pass: max commutes with sign
    if len(x.shape) != 3 or any(d != 1 for d in attr(node, "dilations", [1, 1])):
        raise UnsupportedLayer(node.name, "only 2-D max pooling without dilation is supported")
    kernel, strides, (top, bottom, left, right), _ = _pool_geometry(node, x.shape[1:3])
    t = x.tensor
    if top or left or bottom or right:
        t = b.pad_nhwc(t, top, bottom, left, right, float("-inf"), f"{node.name}_pad")
    y = keras.layers.MaxPool2D(kernel, strides=strides, padding="valid", name=b.name(node.name or "maxpool"))(t)
    return [replace(x, tensor=y, shape=torch_shape(y, "nhwc"))]


def _averagepool(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """Average pooling; with padding or ceil_mode, zeros padded and each window's sum divided by PyTorch's count
    (the padding inside the input's padded extent counts with count_include_pad, the ceil_mode overhang never)."""
    x = b.to_canonical(b.real(node.inputs[0]))
    h, w = x.shape[1:3]
    kernel, strides, (top, bottom, left, right), (oh, ow) = _pool_geometry(node, (h, w))
    if not (top or bottom or left or right):
        y = keras.layers.AveragePooling2D(kernel, strides=strides, padding="valid",
                                          name=b.name(node.name or "avgpool"))(x.tensor)
        return [replace(x, tensor=y, shape=torch_shape(y, "nhwc"))]
    given = [int(p) for p in attr(node, "pads", [0, 0, 0, 0])]  # ONNX order: top, left, bottom, right
    counted = np.zeros((h + top + bottom, w + left + right), np.float32)
    if int(attr(node, "count_include_pad", 0)):
        counted[:h + given[0] + given[2], :w + given[1] + given[3]] = 1
    else:
        counted[top:top + h, left:left + w] = 1
    windows = np.lib.stride_tricks.sliding_window_view(counted, kernel)[::strides[0], ::strides[1]]
    count = windows.sum(axis=(2, 3))[:oh, :ow]
    scale = (kernel[0] * kernel[1] / count)[None, :, :, None].astype(np.float32)
    t = b.pad_nhwc(x.tensor, top, bottom, left, right, 0.0, f"{node.name}_pad")
    y = keras.layers.AveragePooling2D(kernel, strides=strides, padding="valid", name=b.name(node.name or "avgpool"))(t)
    y = b.lam(lambda z: z * scale, y, f"{node.name or 'avgpool'}_count")
    return [replace(x, tensor=y, shape=torch_shape(y, "nhwc"))]


def _global_pool(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.to_canonical(b.real(node.inputs[0]))
    reduce = tf.reduce_mean if node.op_type == "GlobalAveragePool" else tf.reduce_max
    y = b.lam(lambda z: reduce(z, axis=[1, 2], keepdims=True), x.tensor, node.name or node.op_type)
    return [Val(y, torch_shape(y, "nhwc"), "nhwc")]


def _reduce(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """ReduceMean / ReduceMax / ReduceSum over constant axes (opset 18: axes as an input)."""
    x = b.real(node.inputs[0])
    axes_arr = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    rank = len(x.shape) + 1
    axes = sorted(int(a) % rank for a in (axes_arr if axes_arr is not None else range(rank)))
    keep = bool(attr(node, "keepdims", 1))
    if 0 in axes:
        raise UnsupportedLayer(node.name, "reduction over the batch dimension")
    x = b.to_canonical(x)
    if x.layout == "nhwc":  # PyTorch axis → NHWC axis
        axes = sorted(NHWC_AXIS[a] for a in axes)
        if not keep and axes != [1, 2]:
            x, axes = b.to_plain(x), sorted(int(a) % rank for a in axes_arr)  # type: ignore[union-attr]
    reduce = {"ReduceMean": tf.reduce_mean, "ReduceMax": tf.reduce_max, "ReduceSum": tf.reduce_sum}[node.op_type]
    y = b.lam(lambda z: reduce(z, axis=axes, keepdims=keep), x.tensor, node.name or node.op_type)
    layout = x.layout if keep else "plain"
    return [Val(y, torch_shape(y, layout), layout)]


def _argmax(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """``logits.argmax(1)``: ARG_MAX over one axis, int64 as PyTorch returns it (the first of equal maxima)."""
    x = b.to_plain(b.real(node.inputs[0]))
    axis, keep = int(attr(node, "axis", 0)) % (len(x.shape) + 1), bool(attr(node, "keepdims", 1))
    if axis == 0 or int(attr(node, "select_last_index", 0)):
        raise UnsupportedLayer(node.name, "ArgMax over the batch, or picking the last of equal maxima")
    hint = node.name or "argmax"
    y = b.lam(lambda z: tf.math.argmax(z, axis=axis, output_type=tf.int64), x.tensor, hint)
    if keep:
        y = b.lam(lambda z: tf.expand_dims(z, axis), y, f"{hint}_keep")
    return [Val(y, torch_shape(y, "plain"), "plain")]


EMITTERS: dict[tuple[str, str], Callable[[KerasBuilder, ir.Node], list[Val]]] = {
    ("", "Conv"): _conv, ("", "ConvTranspose"): conv_transpose,
    ("", "Gemm"): _gemm, ("", "MatMul"): _gemm,
    ("", "BatchNormalization"): _batchnorm, ("", "LayerNormalization"): layer_norm,
    ("", "InstanceNormalization"): instance_norm,
    ("", "Resize"): resize, ("", "Split"): split, ("", "DepthToSpace"): depth_to_space,
    ("", "MaxPool"): _maxpool,
    ("", "AveragePool"): _averagepool,
    ("", "GlobalAveragePool"): _global_pool, ("", "GlobalMaxPool"): _global_pool,
    ("", "Pad"): pad, ("", "ArgMax"): _argmax,
    **{("", op): _reduce for op in ("ReduceMean", "ReduceMax", "ReduceSum")},
    ("", "Flatten"): reshape,
    ("", "Identity"): identity,
    ("", "Expand"): expand, ("", "Tile"): tile,
    ("", "Clip"): _clip,
    ("", "LeakyRelu"): _leaky_relu,
    ("", "PRelu"): _prelu,
    ("", "Softmax"): _softmax,
    ("", "LogSoftmax"): _softmax,
    ("", "Transpose"): transpose,
    **{("", op): _elementwise for op in BINARY_OPS},
    **DECISION_EMITTERS,
    **{("", op): activation for op in FORMULAS},
    ("", "Erf"): erf,
    **{("", op): _unary for op in UNARY_OPS},
    **{("", op): shape_only for op in SHAPE_OPS},
    (HTAF_DOMAIN, "Heaviside"): step,
    (HTAF_DOMAIN, "Sign"): step,
    (BINARY_DOMAIN, BINARY_OP): binary,
}
