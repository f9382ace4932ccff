"""Transposed convolutions (a U-Net's or a decoder's learned upsampling) as TFLite's TRANSPOSE_CONV.

TFLite's op pads VALID or SAME only; PyTorch's ``padding`` crops the full output on both sides and its
``output_padding`` lengthens it at the end. So the layer runs VALID, without bias, and the rows PyTorch keeps
are cut from its output (zero rows added where PyTorch's output reaches past the full one); the bias comes last."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer
from htaf_export.passes.util import attr, const_array

from .keras_builder import EmittedLayer, KerasBuilder, Val, keras, tf
from .layouts import torch_shape
from .tflite_binary import is_binary_weight, layer_name


def _kept(size: int, kernel: int, stride: int, pad_start: int, pad_end: int, extra: int) -> tuple[int, int, int]:
    """(first row kept, rows kept, zero rows after the VALID output) along one axis."""
    valid = size * stride + max(kernel - stride, 0)  # TFLite's VALID output
    full = (size - 1) * stride + kernel  # PyTorch's output before padding crops it
    out = full - pad_start - pad_end + extra
    if out <= 0:
        raise ValueError("empty output")
    return pad_start, min(out, valid - pad_start), max(0, pad_start + out - valid)


def conv_transpose(b: KerasBuilder, node: ir.Node) -> list[Val]:
    name = layer_name(node)
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 4:
        raise UnsupportedLayer(name, "ConvTranspose2d needs constant 2-D weights on the TFLite targets")
    if int(attr(node, "group", 1)) != 1 or tuple(attr(node, "dilations", [1, 1])) != (1, 1):
        raise UnsupportedLayer(name, "grouped or dilated ConvTranspose2d has no TFLite translation here")
    if attr(node, "output_shape", None) is not None or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedLayer(name, "ConvTranspose2d with output_shape or auto_pad")
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    x = b.to_canonical(b.real(node.inputs[0]))
    _, h, w = x.shape
    stride = tuple(int(s) for s in attr(node, "strides", [1, 1]))
    top, left, bottom, right = (int(p) for p in attr(node, "pads", [0, 0, 0, 0]))
    extra = tuple(int(p) for p in attr(node, "output_padding", [0, 0]))
    c_in, c_out, kh, kw = weight.shape
    rows, cols = (_kept(n, k, s, a, z, e) for n, k, s, a, z, e in
                  ((h, kh, stride[0], top, bottom, extra[0]), (w, kw, stride[1], left, right, extra[1])))
    y = b.apply(lambda: keras.layers.Conv2DTranspose(c_out, (kh, kw), stride, "valid", use_bias=False,
                                                     name=b.name(name)),
                x.tensor, [weight.transpose(2, 3, 1, 0)], f"convT:{name}")
    shift = np.zeros(c_out, np.float32) if bias is None else bias.astype(np.float32)

    def crop(z):  # NHWC
        z = z[:, rows[0]:rows[0] + rows[1], cols[0]:cols[0] + cols[1], :]
        if rows[2] or cols[2]:
            z = tf.pad(z, [[0, 0], [0, rows[2]], [0, cols[2]], [0, 0]])
        return z + shift

    y = b.lam(crop, y, f"{name}_crop")
    b.layers.append(EmittedLayer(name, "TRANSPOSE_CONV", is_binary_weight(weight), int(weight.size),
                                 "±1 weights as float32: LCE has no transposed binary conv" if is_binary_weight(weight)
                                 else ""))
    return [Val(y, torch_shape(y, "nhwc"), "nhwc")]
