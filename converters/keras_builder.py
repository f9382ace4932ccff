"""IR → a Keras model (tf_keras, plus larq layers for bit-packed binary layers): one small function per op.

PyTorch is NCHW, TFLite NHWC. Every IR value becomes a :class:`Val` that records where its PyTorch tensor
lives in the Keras graph (its *layout*), so layouts change only where an op needs it and never in the
hot path:

    plain      the PyTorch tensor itself (2-D activations, scalars)
    nhwc       a 4-D PyTorch tensor [N, C, H, W] stored as [N, H, W, C]
    nhwc_flat  the flattened [N, C·H·W] of such a tensor, still stored as [N, H, W, C]: a dense layer
               after a flatten reads it with permuted weights (a H×W conv when binary), no transpose
    pixel      a 2-D [N, F] stored as [N, 1, 1, F], so binary dense layers run as 1×1 binary convs

A :class:`Val` may also hold a *pre-sign* y: the PyTorch value is then step(y) (y ≥ 0, or y > 0 for tie
gt). Sign steps stay pre-sign in bit-packed builds, so the next binary layer's input quantizer does the
binarization (LCE turns it into ``LceQuantize`` or a bit-packed ``LceBconv2d`` output); any other consumer
gets the ±1 values (``materialize``). MaxPool, flatten and ±1 padding commute with sign.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from htaf_export.capture import Capture
from htaf_export.errors import BadInput, UnsupportedLayer
from htaf_export.passes.util import const_array
from htaf_export.tflite_file import IoSlot, StepForm, tensorflow

from .kernels import spread
from .layouts import permuted_to_channels_first, static_shape
from .lift_1d import LIFTED
from .lce_plan import FLOAT_PLAN, LcePlan
from .tflite_binary import BinaryLayer

# This module is imported only by the TFLite converter, so TensorFlow loads only for TFLite targets.
tf = tensorflow()
# Ask where the Model class lives: importing larq renames tf.keras itself, but tf_keras stays Keras 2.
if not tf.keras.Model.__module__.startswith("tf_keras"):
    raise BadInput("TensorFlow was imported with Keras 3 before htaf-export; the TFLite targets need Keras 2 "
                   "(tf_keras): set TF_USE_LEGACY_KERAS=1 before anything imports TensorFlow")
keras = tf.keras


class DilatedConv2D(keras.layers.Conv2D):
    """One CONV_2D with dilation factors (Keras' own layer: space-to-batch ops, which TFLite Micro gets wrong)."""

    def call(self, inputs):
        y = tf.nn.conv2d(inputs, self.kernel, strides=self.strides, padding="VALID", dilations=self.dilation_rate)
        return tf.nn.bias_add(y, self.bias) if self.use_bias else y


def larq_module():
    """larq (bit-packed builds only): its QuantConv2D is the pattern LCE's converter bit-packs."""
    try:
        import larq
    except ImportError:
        raise BadInput("--target tflite needs larq and larq-compute-engine: pip install 'htaf-export[tflite]'") from None
    return larq

NHWC_AXIS = {1: 3, 2: 1, 3: 2}  # a PyTorch [N, C, H, W] axis → where a channels-last map stores it
SHAPE_OPS = ("Shape", "Squeeze", "Unsqueeze", "Concat", "Gather", "Slice", "Cast", "CastLike", "Reshape", "Range",
             "ConstantOfShape")


@dataclass(frozen=True)
class Presign:
    levels: str  # "pm1" or "01"
    tie: str  # "ge" or "gt"



@dataclass
class Val:
    """Where one IR value lives in the Keras graph (see the module docstring)."""

    tensor: Any = None
    shape: tuple[int, ...] = ()  # PyTorch shape without the batch
    layout: str = "plain"
    const: np.ndarray | None = None  # a constant, broadcasting like numpy against [N, *shape] tensors
    presign: Presign | None = None
    source: tuple[int, ...] | None = None  # nhwc_flat: the PyTorch (C, H, W) it flattens
    shape_only: bool = False  # shape arithmetic (batch size), which the Keras graph does not need

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape in the Keras/TFLite graph, without the batch."""
        if self.layout == "nhwc":
            c, h, w = self.shape
            return (h, w, c)
        if self.layout == "nhwc_flat":
            c, h, w = self.source  # type: ignore[misc]
            return (h, w, c)
        if self.layout == "pixel":
            return (1, 1, self.shape[0])
        return self.shape


@dataclass(frozen=True)
class EmittedLayer:
    """What one weight layer became in the Keras graph (for the export summary)."""

    name: str
    keras: str  # QuantConv2D, Conv2D, DepthwiseConv2D, Dense
    binary_weights: bool
    numel: int
    note: str = ""
    binary: BinaryLayer | None = None
    lce: LcePlan = FLOAT_PLAN


@dataclass(frozen=True)
class Built:
    """The deployed Keras model; where its inputs and outputs are; how each step tensor is laid out."""

    model: Any
    inputs: tuple[IoSlot, ...]
    outputs: tuple[IoSlot, ...]
    steps: dict[str, StepForm]
    layers: tuple[EmittedLayer, ...] = ()


def _keras_layer_name(tensor) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.layer.name if history is not None else ""


class KerasBuilder:
    """Walks the IR in graph order, emitting Keras layers; ``bitpacked`` selects larq layers for binary ones."""

    def __init__(self, bitpacked: bool) -> None:
        # Keras builds functional models in one global graph whose name scopes (larq's ste_sign, ste_sign_1, ...)
        # count up across builds; a fresh graph makes the same model give the same tensor names, so the same file.
        keras.backend.clear_session()
        self.bitpacked = bitpacked
        self.values: dict[int, Val] = {}
        self.step_vals: dict[str, Val] = {}
        self.layers: list[EmittedLayer] = []
        self._names: set[str] = set()
        self._shared: dict[str, tuple[Any, list[np.ndarray]]] = {}
        self._materialized: dict[tuple[int, Presign], Any] = {}

    # ---- bookkeeping -------------------------------------------------------------------------

    def name(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", hint).strip("_")[:40] or "op"
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def apply(self, make: Callable[[], Any], x, weights: list[np.ndarray], share: str):
        """Call a new weight layer from ``make`` on ``x`` with ``weights``. Calls with the same ``share`` key and
        equal weights (an SNN's layer at every time step) reuse one Keras layer: one copy in the file."""
        weights = [np.ascontiguousarray(w, dtype=np.float32) for w in weights]
        if share in self._shared:
            layer, kept = self._shared[share]
            if len(kept) == len(weights) and all(np.array_equal(a, w) for a, w in zip(kept, weights)):
                return layer(x)
        layer = make()
        y = layer(x)
        layer.set_weights(weights)
        self._shared[share] = (layer, weights)
        return y

    def lam(self, fn: Callable, inputs, hint: str):
        return keras.layers.Lambda(fn, name=self.name(hint))(inputs)

    def reshape(self, x, shape: tuple[int, ...], hint: str):
        """Reshape keeping the batch: a constant [-1, …] shape, one RESHAPE op (Keras' Reshape adds shape ops)."""
        target = [-1, *shape]
        return self.lam(lambda z: tf.reshape(z, target), x, hint)

    def get(self, value: ir.Value | None) -> Val:
        if value is None:
            raise UnsupportedLayer("?", "missing input")
        if id(value) in self.values:
            return self.values[id(value)]
        array = const_array(value)
        if array is not None:
            return Val(const=array, shape=tuple(array.shape))
        raise UnsupportedLayer(value.name or "?", "value is used before it is computed")

    def set(self, value: ir.Value, val: Val) -> None:
        self.values[id(value)] = val

    # ---- layouts -----------------------------------------------------------------------------

    def materialize(self, v: Val) -> Val:
        """The PyTorch values of a pre-sign Val: ±1 (or 0/1), computed with the same comparison (once per tensor)."""
        if v.presign is None:
            return v
        key = (id(v.tensor), v.presign)
        if key not in self._materialized:
            self._materialized[key] = self._materialize(v)
        return replace(v, tensor=self._materialized[key], presign=None)

    def _materialize(self, v: Val):
        gt, heaviside = v.presign.tie == "gt", v.presign.levels == "01"  # type: ignore[union-attr]

        def step(y):
            fired = tf.greater(y, 0.0) if gt else tf.greater_equal(y, 0.0)
            return tf.cast(fired, tf.float32) if heaviside else tf.where(fired, 1.0, -1.0)

        return self.lam(step, v.tensor, "sign")

    def real(self, value: ir.Value | None) -> Val:
        """A computed tensor with its PyTorch values (not a constant, not pre-sign)."""
        v = self.get(value)
        if v.tensor is None:
            raise UnsupportedLayer(value.name if value is not None else "?", "expected a computed tensor here")
        return self.materialize(v)

    def to_plain(self, v: Val) -> Val:
        if v.layout == "plain":
            return v
        if v.layout == "nhwc":
            t = self.lam(lambda z: tf.transpose(z, [0, 3, 1, 2]), v.tensor, "to_nchw")
        elif v.layout == "nhwc_flat":
            size = int(np.prod(v.shape))
            t = self.lam(lambda z: tf.reshape(tf.transpose(z, [0, 3, 1, 2]), [-1, size]), v.tensor, "flatten_nchw")
        else:  # pixel
            t = self.reshape(v.tensor, v.shape, "unpixel")
        return Val(t, v.shape, "plain", presign=v.presign)

    def to_canonical(self, v: Val) -> Val:
        """4-D PyTorch tensors as nhwc, everything else plain."""
        if len(v.shape) == 3:
            if v.layout == "nhwc":
                return v
            t = self.lam(lambda z: tf.transpose(z, [0, 2, 3, 1]), v.tensor, "to_nhwc")
            return Val(t, v.shape, "nhwc", presign=v.presign)
        return self.to_plain(v)

    def to_pixel(self, v: Val) -> Val:
        if v.layout == "pixel":
            return v
        v = self.to_plain(v)
        t = self.reshape(v.tensor, (1, 1, v.shape[0]), "pixel")
        return Val(t, v.shape, "pixel", presign=v.presign)

    @staticmethod
    def const_like(array: np.ndarray, like: Val) -> np.ndarray:
        """A constant that broadcasts against the PyTorch tensor of ``like``, moved into ``like``'s layout."""
        full = (1,) + like.shape
        if array.ndim > len(full):
            raise UnsupportedLayer("constant", f"shape {array.shape} does not broadcast against {full}")
        a = np.asarray(array, dtype=np.float32).reshape((1,) * (len(full) - array.ndim) + array.shape)
        if a.shape[0] != 1:
            raise UnsupportedLayer("constant", f"shape {array.shape} varies along the batch")
        a = a[0]
        if a.size == 1:
            return a.reshape(())
        if like.layout == "nhwc":
            if a.ndim == 3 and a.shape[1:] == (1, 1) and a.shape[0] == like.shape[0]:
                return np.ascontiguousarray(a.reshape(-1))  # per channel: (C,) broadcasts over NHWC's last axis
            return np.ascontiguousarray(np.broadcast_to(a, like.shape).transpose(1, 2, 0))
        if like.layout == "nhwc_flat":
            full_a = np.broadcast_to(a, like.shape).reshape(like.source)  # type: ignore[arg-type]
            return np.ascontiguousarray(full_a.transpose(1, 2, 0))
        if like.layout == "pixel":  # (C,) broadcasts over the last axis of [batch, 1, 1, C] alike, and LCE
            # fuses an add after a binary conv into its post_activation_bias, which must be 1-D
            return np.broadcast_to(a, like.shape).reshape(-1).copy()
        return a

    # ---- the walk ----------------------------------------------------------------------------

    def build(self, cap: Capture, graph: ir.Graph,
              emitters: dict[tuple[str, str], Callable[["KerasBuilder", ir.Node], list[Val]]]) -> Built:
        """Walk ``graph`` in order, emitting each node with its function in ``emitters`` (``keras_ops.EMITTERS``)."""
        inputs, in_specs = [], []
        for value in graph.inputs:
            shape = static_shape(value)
            layout = "nhwc" if len(shape) == 3 and not permuted_to_channels_first(value) else "plain"
            stored = Val(None, shape, layout).stored_shape
            tensor = keras.Input(shape=stored, name=self.name(value.name or f"in_{len(inputs)}"))  # signature key
            inputs.append(tensor)
            self.set(value, Val(tensor, shape, layout))
            in_specs.append(IoSlot(value.name, -1, layout, shape))
        for node in graph:
            emit = emitters.get((node.domain, node.op_type))
            if emit is None:
                raise UnsupportedLayer(node.name or node.op_type, f"no TFLite translation for op {node.op_type!r}")
            results = emit(self, node)
            for value, val in zip(node.outputs, results):
                self.set(value, val)
        outputs, out_specs = [], []
        for k, value in enumerate(graph.outputs):
            v = self.to_canonical(self.real(value))
            key = self.name(value.name or f"out_{k}")  # the signature's key: the model's own output name
            outputs.append(keras.layers.Lambda(lambda z: tf.identity(z), name=key)(v.tensor))
            out_specs.append(IoSlot(value.name, -1, v.layout, v.shape, keras=key))
        model = keras.Model(inputs, outputs, name="htaf_export")
        steps = {}
        lifted = graph.meta.get(LIFTED, set())
        for s in cap.steps:
            v = self.step_vals.get(s.tensor)
            if v is None:
                continue
            presign = v.presign or Presign("pm1" if s.op == "Sign" else "01", s.tie)
            shape = (v.shape[0], *v.shape[2:]) if s.tensor in lifted else v.shape  # a 1-D map as PyTorch has it
            steps[s.tensor] = StepForm(s.tensor, v.layout, tuple(shape), tuple(v.stored_shape), presign.levels,
                                       presign.tie, _keras_layer_name(v.tensor))
        return Built(model, tuple(in_specs), tuple(out_specs), steps, tuple(self.layers))

    def record_step(self, name: str, v: Val) -> Val:
        self.step_vals[name] = v
        return v

    # ---- emitting layers ---------------------------------------------------------------------

    def conv2d(self, x, weight: np.ndarray, bias: np.ndarray | None, stride, group: int, hint: str,
               dilation=(1, 1)):
        """A float conv, VALID padding, OIHW ``weight``; depthwise when every group has one input channel, else
        grouped (TFLite's CONV_2D reads a filter with fewer input channels than its input as groups)."""
        if group > 1 and tuple(dilation) != (1, 1):
            # Keras' grouped/depthwise layers lower dilation to SPACE_TO_BATCH_ND + BATCH_TO_SPACE_ND, which TFLite
            # Micro gets wrong (see DilatedConv2D): the taps spread out with zeros instead
            weight, dilation = spread(weight, dilation), (1, 1)
        out_ch, in_per_group, kh, kw = weight.shape
        use_bias = bias is not None
        if group == 1 or in_per_group > 1:
            kind, kernel = "Conv2D", weight.transpose(2, 3, 1, 0)
            layer = DilatedConv2D if group == 1 and tuple(dilation) != (1, 1) else keras.layers.Conv2D
            make = lambda: layer(out_ch, (kh, kw), strides=stride, padding="valid",  # noqa: E731
                                 dilation_rate=dilation, groups=group, use_bias=use_bias, name=self.name(hint))
        else:
            mult = out_ch // group
            kind, kernel = "DepthwiseConv2D", weight.reshape(group, mult, kh, kw).transpose(2, 3, 0, 1)
            make = lambda: keras.layers.DepthwiseConv2D((kh, kw), strides=stride, padding="valid",  # noqa: E731
                                                        depth_multiplier=mult, dilation_rate=dilation,
                                                        use_bias=use_bias, name=self.name(hint))
        y = self.apply(make, x, [kernel] + ([bias] if use_bias else []), f"{kind}:{hint}:{stride}:{dilation}:{group}")
        return y, kind

    def pad_nhwc(self, x, top: int, bottom: int, left: int, right: int, value: float, hint: str):
        spec = [[0, 0], [top, bottom], [left, right], [0, 0]]
        return self.lam(lambda z: tf.pad(z, spec, constant_values=value), x, hint)

    def dense(self, v: Val, weight: np.ndarray, bias: np.ndarray | None, hint: str) -> tuple[Val, str]:
        """A float dense layer y = x·Wᵀ + b (``weight`` [out, in]) reading plain or nhwc_flat input."""
        x = v
        if v.layout == "nhwc_flat":  # permute the weights instead of the activations
            c, h, w = v.source  # type: ignore[misc]
            weight = weight.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)
            t = keras.layers.Flatten(name=self.name("flatten"))(v.tensor)
        else:
            x = self.to_plain(v)
            t = x.tensor
        make = lambda: keras.layers.Dense(weight.shape[0], use_bias=bias is not None, name=self.name(hint))  # noqa: E731
        y = self.apply(make, t, [weight.T] + ([bias] if bias is not None else []), f"Dense:{hint}:{v.layout}")
        return Val(y, (weight.shape[0],), "plain"), "Dense"

    def dense_as_conv(self, v: Val, weight: np.ndarray, bias: np.ndarray | None, hint: str,
                      quantizer=None) -> tuple[Val, str]:
        """A dense layer as a conv over a [1,1,F] pixel or each pixel of an nhwc map (1×1 kernel), or over the H×W map
        it flattens (H×W kernel): binary when ``quantizer`` is given (larq QuantConv2D), else a float Conv2D."""
        if v.layout == "nhwc_flat":
            c, h, w = v.source  # type: ignore[misc]
            kernel = weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0)
            t = v.tensor
        elif v.layout == "nhwc":  # at each pixel of a map, over its channels
            kernel = weight.T.reshape(1, 1, weight.shape[1], weight.shape[0])
            t = v.tensor
        else:
            p = self.to_pixel(v)
            kernel = weight.T.reshape(1, 1, weight.shape[1], weight.shape[0])
            t = p.tensor
        kh, kw = kernel.shape[:2]
        use_bias = bias is not None
        if quantizer is None:
            kind = "Conv2D"
            make = lambda: keras.layers.Conv2D(weight.shape[0], (kh, kw), padding="valid", use_bias=use_bias,  # noqa: E731
                                               name=self.name(hint))
        else:
            kind = "QuantConv2D"
            make = lambda: larq_module().layers.QuantConv2D(weight.shape[0], (kh, kw), padding="valid",  # noqa: E731
                                                   input_quantizer=quantizer, kernel_quantizer=None,
                                                   use_bias=use_bias, name=self.name(hint))
        y = self.apply(make, t, [kernel] + ([bias] if use_bias else []), f"{kind}:{hint}:{v.layout}:{quantizer}")
        out = (weight.shape[0], *v.shape[1:]) if v.layout == "nhwc" else (weight.shape[0],)
        return Val(y, out, "nhwc" if v.layout == "nhwc" else "pixel"), kind

    def quantizer(self, v: Val):
        """larq input quantizer binarizing ``v`` exactly: ste_sign (x < 0 → −1) or, for tie gt, x > 0 → +1."""
        if v.presign is not None and v.presign.tie == "gt":
            return sign_gt
        return "ste_sign"


def sign_gt(z):
    """larq input quantizer for tie gt: +1 where z > 0, else −1 (LCE makes it GREATER → LceQuantize)."""
    return tf.where(tf.greater(z, 0.0), 1.0, -1.0)
