"""Keras emitter for the product of two computed tensors (``q @ k.transpose(-2, -1)`` and ``attn @ v`` in
attention): a batched matrix product, TFLite's BATCH_MATMUL."""

from __future__ import annotations

import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer

from .keras_builder import KerasBuilder, Val, tf


def activation_product(b: KerasBuilder, node: ir.Node, name: str) -> list[Val]:
    """MatMul of two computed tensors of matching leading axes, on the PyTorch layout of each."""
    a, c = (b.to_plain(b.real(v)) for v in node.inputs[:2])
    if len(a.shape) != len(c.shape) or len(a.shape) < 2 or a.shape[:-2] != c.shape[:-2] or a.shape[-1] != c.shape[-2]:
        raise UnsupportedLayer(name, f"a product of computed tensors shaped {a.shape} and {c.shape} (TFLite takes "
                                     f"matching leading axes only)")
    t = b.lam(lambda zs: tf.linalg.matmul(zs[0], zs[1]), [a.tensor, c.tensor], name or "matmul")
    return [b.to_canonical(Val(t, (*a.shape[:-1], c.shape[-1]), "plain"))]
