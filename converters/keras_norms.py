"""Normalizations over the features of each position (a transformer's LayerNorm before its binary layers)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer
from htaf_export.passes.util import attr, const_array

from .keras_builder import KerasBuilder, Val, tf


def layer_norm(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """LayerNormalization over the last axis of a tensor stored as PyTorch has it (a Keras LayerNormalization)."""
    x = b.to_plain(b.real(node.inputs[0]))
    rank = len(x.shape) + 1
    if int(attr(node, "axis", -1)) % rank != rank - 1:
        raise UnsupportedLayer(node.name, "LayerNorm over more than the last axis (normalized_shape of several "
                                          "dimensions)")
    if len(node.outputs) > 1 and any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        raise UnsupportedLayer(node.name, "LayerNorm's mean or deviation read by later ops")
    features = x.shape[-1]
    given = [node.inputs[i] if len(node.inputs) > i else None for i in (1, 2)]
    scale, shift = (const_array(v) if v is not None else None for v in given)
    if any(v is not None and p is None for v, p in zip(given, (scale, shift))):
        raise UnsupportedLayer(node.name, "LayerNorm with a computed scale or shift")
    scale = np.broadcast_to(scale if scale is not None else np.float32(1), (features,))
    shift = np.broadcast_to(shift if shift is not None else np.float32(0), (features,))
    eps = float(attr(node, "epsilon", 1e-5))
    scale, shift = scale.astype(np.float32), shift.astype(np.float32)

    def norm(z):  # PyTorch's order of operations; Keras' layer adds ops (REDUCE_PROD) TFLite Micro lacks
        centred = z - tf.reduce_mean(z, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
        return centred * tf.math.rsqrt(variance + eps) * scale + shift

    return [replace(x, tensor=b.lam(norm, x.tensor, node.name or "layer_norm"))]
