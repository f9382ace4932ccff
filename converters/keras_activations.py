"""Smooth activations on the Keras graph, each as the TFLite builtin that computes it where there is one
(``ELU``, ``GELU``, ``HARD_SWISH``) and as its defining formula on builtins otherwise. PyTorch's exporter
writes GELU as ``x·½·(1 + erf(x/√2))`` and TFLite has no ``ERF``: :func:`fuse_gelu` turns that formula back
into one ``Gelu`` node first."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from htaf_export.errors import UnsupportedLayer
from htaf_export.passes.base import apply_rules
from htaf_export.passes.util import attr, const_array

from .keras_builder import KerasBuilder, Val, tf


def _scalar(value: ir.Value, number: float, rel: float = 1e-6) -> bool:
    array = const_array(value)
    return array is not None and array.size == 1 and math.isclose(float(array.reshape(())), number, rel_tol=rel)


class GeluFromErf(RewriteRuleClassBase):
    """Mul(X, Mul(Add(Erf(Div(X, √2)), 1), ½)) → Gelu(X), in any operand order."""

    def pattern(self, op, x, root, one, half):
        return op.Mul(x, op.Mul(op.Add(op.Erf(op.Div(x, root)), one), half))

    def check(self, context, x, root, one, half, **_) -> MatchResult:
        if not (_scalar(root, math.sqrt(2.0)) and _scalar(one, 1.0, 0.0) and _scalar(half, 0.5, 0.0)):
            return MatchResult().fail("not x·½·(1 + erf(x/√2))")
        return MatchResult()

    def rewrite(self, op, x, **_):
        return op.Gelu(x, approximate="none")


class GeluFromErfHalfLast(GeluFromErf):
    """Mul(Mul(X, Add(Erf(Div(X, √2)), 1)), ½) → Gelu(X): how the TorchScript exporter writes it."""

    def pattern(self, op, x, root, one, half):
        return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, root)), one)), half)


def fuse_gelu(model: ir.Model) -> None:
    apply_rules(model, [GeluFromErf.rule(), GeluFromErfHalfLast.rule()], commute=True)


def _gelu(z):
    """The form both converters turn into one ``GELU`` (TensorFlow's own ``gelu`` writes erfc, which LCE's keeps)."""
    return 0.5 * z * (1.0 + tf.math.erf(z * 0.7071067811865476))


def _alpha_elu(z, alpha: float):
    return tf.nn.elu(z) if alpha == 1.0 else tf.where(z > 0, z, alpha * (tf.exp(z) - 1.0))


FORMULAS: dict[str, Callable[[ir.Node], Callable]] = {
    "Gelu": lambda n: _gelu if attr(n, "approximate", "none") != "tanh" else (lambda z: tf.nn.gelu(z, approximate=True)),
    "Elu": lambda n: (lambda z: _alpha_elu(z, float(attr(n, "alpha", 1.0)))),
    "Celu": lambda n: (lambda z, a=float(attr(n, "alpha", 1.0)): tf.maximum(z, 0.0) +
                       tf.minimum(0.0, a * (tf.exp(z / a) - 1.0))),
    "Selu": lambda n: (lambda z: float(attr(n, "gamma", 1.0507009873554805)) *
                       _alpha_elu(z, float(attr(n, "alpha", 1.6732632423543772)))),
    "Softplus": lambda n: tf.math.softplus,
    "HardSigmoid": lambda n: (lambda z: tf.clip_by_value(float(attr(n, "alpha", 0.2)) * z + float(attr(n, "beta", 0.5)),
                                                         0.0, 1.0)),
    "HardSwish": lambda n: (lambda z: z * tf.nn.relu6(z + 3.0) / 6.0),
    "Mish": lambda n: (lambda z: z * tf.math.tanh(tf.math.softplus(z))),
}


def activation(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.real(node.inputs[0])
    formula = FORMULAS[node.op_type](node)
    return [replace(x, tensor=b.lam(formula, x.tensor, node.name or node.op_type))]


def erf(b: KerasBuilder, node: ir.Node) -> list[Val]:
    raise UnsupportedLayer(node.name, "TFLite has no erf; GELU is converted when written as PyTorch writes it, "
                                      "x·½·(1 + erf(x/√2)) (nn.GELU, F.gelu)")
