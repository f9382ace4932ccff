"""Keras emitters for the ops that enlarge a map: resizing (``nn.Upsample``, ``F.interpolate``) and sub-pixel
upsampling (``nn.PixelShuffle``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer
from htaf_export.passes.util import attr, const_array

from .keras_builder import KerasBuilder, Val, tf


# (mode, coordinate transformation) → TFLite's resize and its (align_corners, half_pixel_centers)
RESIZES = {("nearest", "asymmetric"): ("nearest", False, False), ("linear", "half_pixel"): ("bilinear", False, True),
           ("linear", "pytorch_half_pixel"): ("bilinear", False, True),
           ("linear", "align_corners"): ("bilinear", True, False)}


def resize(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """Resizing of an [N, C, H, W] map as PyTorch computes it (``nn.Upsample``, ``F.interpolate``): nearest, output
    pixel i reading input pixel floor(i · in / out) (TFLite's nearest resize without half pixels); bilinear, with
    half pixels (``align_corners=False``: the source clamped at the edge, as TFLite's) or with aligned corners."""
    x = b.to_canonical(b.real(node.inputs[0]))
    how = (attr(node, "mode", "nearest"), attr(node, "coordinate_transformation_mode", "half_pixel"))
    nearest = attr(node, "nearest_mode", "round_prefer_floor")
    found = RESIZES.get(how) if how[0] != "nearest" or nearest == "floor" else None
    if len(x.shape) != 3 or found is None:
        raise UnsupportedLayer(node.name, f"resizing ({', '.join(map(str, how))}) of a {len(x.shape) + 1}-D tensor: "
                                          "the TFLite targets take nearest and bilinear resizing of [N, C, H, W] maps")
    c, h, w = x.shape
    size = _resized_size(b, node, h, w)
    kind, corners, half = found
    scales = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if int(attr(node, "antialias", 0)):
        raise UnsupportedLayer(node.name, "antialiased resizing (antialias=True) has no TFLite form")
    if scales is not None and scales.size == 4 and kind == "bilinear" and (h * scales[2], w * scales[3]) != size:
        raise UnsupportedLayer(node.name, "bilinear resizing by a scale that gives no whole size (PyTorch places its "
                                          "samples by the scale, TFLite by the sizes): resize to a size (size=…)")
    op = tf.compat.v1.image.resize_nearest_neighbor if kind == "nearest" else tf.compat.v1.image.resize_bilinear
    t = b.lam(lambda z: op(z, size, align_corners=corners, half_pixel_centers=half), x.tensor, "resize")
    return [Val(t, (c, *size), "nhwc")]


def depth_to_space(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """``nn.PixelShuffle(r)`` (DepthToSpace, CRD: channel c·r² + i·r + j → pixel (i, j) of channel c): TFLite's
    DEPTH_TO_SPACE reads the channels the other way round (DCR: (i·r + j)·C + c), so a constant gather of the
    channels comes first. Both only move values: exact."""
    x = b.to_canonical(b.real(node.inputs[0]))
    r = int(attr(node, "blocksize", 1))
    if len(x.shape) != 3 or x.shape[0] % (r * r):
        raise UnsupportedLayer(node.name, f"DepthToSpace of a {len(x.shape) + 1}-D tensor")
    c, h, w = x.shape[0] // (r * r), x.shape[1], x.shape[2]
    crd = attr(node, "mode", "DCR") == "CRD"
    order = np.array([k * r * r + ij for ij in range(r * r) for k in range(c)], np.int32)
    t = b.lam(lambda z: tf.nn.depth_to_space(tf.gather(z, order, axis=3) if crd else z, r), x.tensor,
              node.name or "depth_to_space")
    return [Val(t, (c, h * r, w * r), "nhwc")]


def _resized_size(b: KerasBuilder, node: ir.Node, h: int, w: int) -> tuple[int, int]:
    """Resize's output height and width: from constant sizes or scales, or a traced size (the batch and channels
    read off the input, then constants)."""
    scales, sizes = (const_array(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
                     for i in (2, 3))
    if sizes is not None and sizes.size == 4:
        return int(sizes[2]), int(sizes[3])
    if scales is not None and scales.size == 4 and scales[0] == scales[1] == 1:
        return int(np.floor(h * scales[2])), int(np.floor(w * scales[3]))
    producer = node.inputs[3].producer() if len(node.inputs) > 3 and node.inputs[3] is not None else None
    last = b.get(producer.inputs[-1]).const if producer is not None and producer.op_type == "Concat" else None
    if last is not None and np.size(last) >= 2:
        return tuple(int(v) for v in np.reshape(last, -1)[-2:])  # type: ignore[return-value]
    raise UnsupportedLayer(node.name, "resizing to a size computed at run time, or of the batch or channels")
