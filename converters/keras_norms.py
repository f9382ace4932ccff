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


def instance_norm(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """InstanceNormalization: each channel of each sample over its positions (InstanceNorm, and GroupNorm,
    which the exporter writes as one between two reshapes to [N, groups, -1])."""
    x = b.real(node.inputs[0])
    rank = len(x.shape) + 1
    if rank < 3:
        raise UnsupportedLayer(node.name, "InstanceNormalization of a tensor without positions")
    scale, shift = (const_array(v) for v in node.inputs[1:3])
    if scale is None or shift is None:
        raise UnsupportedLayer(node.name, "InstanceNorm / GroupNorm with a computed scale or shift")
    eps = float(attr(node, "epsilon", 1e-5))
    if x.layout == "nhwc":  # channels last already: no transposes
        per_channel, positions = (x.shape[0],), [1, 2]
    else:
        x = b.to_plain(x)
        per_channel, positions = (x.shape[0],) + (1,) * (rank - 2), list(range(2, rank))
    scale, shift = (np.asarray(v, np.float32).reshape(per_channel) for v in (scale, shift))

    def norm(z):  # PyTorch's order of operations: centre, mean square, rsqrt
        centred = z - tf.reduce_mean(z, axis=positions, keepdims=True)
        variance = tf.reduce_mean(tf.square(centred), axis=positions, keepdims=True)
        return centred * tf.math.rsqrt(variance + eps) * scale + shift

    return [replace(x, tensor=b.lam(norm, x.tensor, node.name or "instance_norm"))]
