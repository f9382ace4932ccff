"""ONNX ``Pad`` of a 4-D map on the Keras graph: constant values (``PAD``), ``reflect`` (``MIRROR_PAD``), and
``edge`` / ``wrap`` (PyTorch's replicate and circular padding) as slices joined by ``CONCATENATION``. The last
three copy input values, so they commute with a deferred sign: a binary conv behind them still reads ±1."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer
from htaf_export.passes.util import attr, const_array

from .keras_builder import KerasBuilder, Val, tf
from .layouts import torch_shape
from .tflite_binary import COPYING_PADS, trim_padding


def pad(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.to_canonical(b.get(node.inputs[0]))
    pads = const_array(node.inputs[1])
    value_arr = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(())
    mode = attr(node, "mode", "constant")
    if mode not in ("constant", *COPYING_PADS) or pads is None or value_arr is None or len(x.shape) != 3 \
            or len(pads) != 8 or pads[0] or pads[1] or pads[4] or pads[5]:
        raise UnsupportedLayer(node.name, f"only spatial padding of 4-D tensors is supported (mode {mode})")
    value = float(value_arr.reshape(()))
    if x.presign is not None and mode == "constant" and abs(value) != 1.0:
        x = b.materialize(x)  # only ±1 padding commutes with sign
    top, left, bottom, right = int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])
    conv = _only_conv_consumer(node)
    if conv is not None:  # see trim_padding: LCE would otherwise fuse PyTorch's (1, 1) at stride 2 wrongly
        kernel = attr(conv, "kernel_shape", None) or const_array(conv.inputs[1]).shape[2:]  # type: ignore[union-attr]
        (kh, kw), (sh, sw) = tuple(kernel), tuple(attr(conv, "strides", [1, 1]))
        (dh, dw), (_, h, w) = tuple(attr(conv, "dilations", [1, 1])), x.shape
        bottom, right = trim_padding(h, kh, sh, top, bottom, dh), trim_padding(w, kw, sw, left, right, dw)
    hint = node.name or "pad"
    if mode == "constant":
        t = b.pad_nhwc(x.tensor, top, bottom, left, right, value, hint)
    elif mode == "reflect":
        spec = [[0, 0], [top, bottom], [left, right], [0, 0]]
        t = b.lam(lambda z: tf.pad(z, spec, mode="REFLECT"), x.tensor, hint)
    else:
        t = b.lam(lambda z: _copied_edges(_copied_edges(z, 1, top, bottom, mode), 2, left, right, mode), x.tensor, hint)
    return [replace(x, tensor=t, shape=torch_shape(t, "nhwc"))]


def _copied_edges(z, axis: int, before: int, after: int, mode: str):
    """``z`` grown along ``axis`` by copies of its own rows (one GATHER): the edge row repeated, or the far side
    wrapped round."""
    size = z.shape[axis]
    if mode == "wrap" and max(before, after) > size:
        raise UnsupportedLayer("pad", f"circular padding {max(before, after)} wider than the input ({size})")
    if not (before or after):
        return z
    head = [0] * before if mode == "edge" else list(range(size - before, size))
    tail = [size - 1] * after if mode == "edge" else list(range(after))
    return tf.gather(z, tf.constant(head + list(range(size)) + tail, tf.int32), axis=axis)


def _only_conv_consumer(node: ir.Node) -> ir.Node | None:
    """The Conv (without padding of its own) that alone reads ``node``'s output, if that is the case."""
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        return None
    conv = uses[0].node
    if conv.domain != "" or conv.op_type != "Conv" or any(attr(conv, "pads", [0, 0, 0, 0])):
        return None
    weight = const_array(conv.inputs[1])
    if "kernel_shape" not in conv.attributes and (weight is None or weight.ndim != 4):
        return None
    return conv
