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
from htaf_export.ops import HTAF_DOMAIN
from htaf_export.passes.util import const_array
from htaf_export.tflite_file import IoSlot, StepForm, tensorflow

from .tflite_binary import DOMAIN as BINARY_DOMAIN
from .tflite_binary import FLOAT_PLAN
from .tflite_binary import OP as BINARY_OP
from .tflite_binary import BinaryLayer, LcePlan, is_binary_weight, layer_name, plan_lce, trim_padding, with_input_size

# This module is imported only by the TFLite converter, so TensorFlow loads only for TFLite targets.
tf = tensorflow()
# Ask where the Model class lives: importing larq renames tf.keras itself, but tf_keras stays Keras 2.
if not tf.keras.Model.__module__.startswith("tf_keras"):
    raise BadInput("TensorFlow was imported with Keras 3 before htaf-export; the TFLite targets need Keras 2 "
                   "(tf_keras): set TF_USE_LEGACY_KERAS=1 before anything imports TensorFlow")
keras = tf.keras


def _larq():
    """larq (bit-packed builds only): its QuantConv2D is the pattern LCE's converter bit-packs."""
    try:
        import larq
    except ImportError:
        raise BadInput("--target tflite needs larq and larq-compute-engine: pip install 'htaf-export[tflite]'") from None
    return larq

SHAPE_OPS = ("Shape", "Squeeze", "Unsqueeze", "Concat", "Gather", "Slice", "Cast", "Reshape", "Range",
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


def _static_shape(value: ir.Value) -> tuple[int, ...]:
    """PyTorch shape of ``value`` without the batch, from the IR; every dimension but the batch must be known."""
    shape = value.shape
    dims = list(shape)[1:] if shape is not None else None
    if dims is None or len(shape) == 0 or not all(isinstance(d, int) for d in dims):  # type: ignore[arg-type]
        raise UnsupportedLayer(value.name or "?", f"the IR does not know the shape of this tensor ({shape})")
    return tuple(int(d) for d in dims)


def _torch_shape(tensor, layout: str) -> tuple[int, ...]:
    """PyTorch shape (without the batch) of a Keras tensor stored in ``layout`` (not nhwc_flat)."""
    dims = tuple(int(d) for d in tensor.shape[1:])
    if layout == "nhwc":
        h, w, c = dims
        return (c, h, w)
    if layout == "pixel":
        return (dims[-1],)
    return dims


def _keras_layer_name(tensor) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.layer.name if history is not None else ""


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


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
        if like.layout == "pixel":
            return np.broadcast_to(a, like.shape).reshape(1, 1, -1).copy()
        return a

    # ---- the walk ----------------------------------------------------------------------------

    def build(self, cap: Capture, graph: ir.Graph) -> Built:
        inputs, in_specs = [], []
        for value in graph.inputs:
            shape = _static_shape(value)
            layout = "nhwc" if len(shape) == 3 else "plain"
            stored = Val(None, shape, layout).stored_shape
            tensor = keras.Input(shape=stored, name=self.name(f"in_{len(inputs)}"))
            inputs.append(tensor)
            self.set(value, Val(tensor, shape, layout))
            in_specs.append(IoSlot(value.name, -1, layout, shape))
        for node in graph:
            emit = EMITTERS.get((node.domain, node.op_type))
            if emit is None:
                raise UnsupportedLayer(node.name or node.op_type, f"no TFLite translation for op {node.op_type!r}")
            results = emit(self, node)
            for value, val in zip(node.outputs, results):
                self.set(value, val)
        outputs, out_specs = [], []
        for k, value in enumerate(graph.outputs):
            v = self.to_canonical(self.real(value))
            outputs.append(self.lam(lambda z: tf.identity(z), v.tensor, f"out_{k}"))
            out_specs.append(IoSlot(value.name, -1, v.layout, v.shape, keras=f"out_{k}"))
        model = keras.Model(inputs, outputs, name="htaf_export")
        steps = {}
        for s in cap.steps:
            v = self.step_vals.get(s.tensor)
            if v is None:
                continue
            presign = v.presign or Presign("pm1" if s.op == "Sign" else "01", s.tie)
            steps[s.tensor] = StepForm(s.tensor, v.layout, tuple(v.shape), tuple(v.stored_shape), presign.levels,
                                       presign.tie, _keras_layer_name(v.tensor))
        return Built(model, tuple(in_specs), tuple(out_specs), steps, tuple(self.layers))

    def record_step(self, name: str, v: Val) -> Val:
        self.step_vals[name] = v
        return v

    # ---- emitting layers ---------------------------------------------------------------------

    def conv2d(self, x, weight: np.ndarray, bias: np.ndarray | None, stride, group: int, hint: str,
               dilation=(1, 1)):
        """A float conv, VALID padding, OIHW ``weight``; depthwise when every group has one input channel."""
        out_ch, in_per_group, kh, kw = weight.shape
        use_bias = bias is not None
        if group == 1:
            kind, kernel = "Conv2D", weight.transpose(2, 3, 1, 0)
            make = lambda: keras.layers.Conv2D(out_ch, (kh, kw), strides=stride, padding="valid",  # noqa: E731
                                               dilation_rate=dilation, use_bias=use_bias, name=self.name(hint))
        elif in_per_group == 1:
            mult = out_ch // group
            kind, kernel = "DepthwiseConv2D", weight.reshape(group, mult, kh, kw).transpose(2, 3, 0, 1)
            make = lambda: keras.layers.DepthwiseConv2D((kh, kw), strides=stride, padding="valid",  # noqa: E731
                                                        depth_multiplier=mult, dilation_rate=dilation,
                                                        use_bias=use_bias, name=self.name(hint))
        else:
            raise UnsupportedLayer(hint, f"grouped conv with {group} groups of {in_per_group} channels")
        y = self.apply(make, x, [kernel] + ([bias] if use_bias else []), f"{kind}:{hint}:{stride}:{dilation}")
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
        """A dense layer as a conv over a [1,1,F] pixel (1×1 kernel) or over the H×W map it flattens (H×W
        kernel): binary when ``quantizer`` is given (larq QuantConv2D), else a float Conv2D."""
        if v.layout == "nhwc_flat":
            c, h, w = v.source  # type: ignore[misc]
            kernel = weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0)
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
            make = lambda: _larq().layers.QuantConv2D(weight.shape[0], (kh, kw), padding="valid",  # noqa: E731
                                                   input_quantizer=quantizer, kernel_quantizer=None,
                                                   use_bias=use_bias, name=self.name(hint))
        y = self.apply(make, t, [kernel] + ([bias] if use_bias else []), f"{kind}:{hint}:{v.layout}:{quantizer}")
        return Val(y, (weight.shape[0],), "pixel"), kind

    def quantizer(self, v: Val):
        """larq input quantizer binarizing ``v`` exactly: ste_sign (x < 0 → −1) or, for tie gt, x > 0 → +1."""
        if v.presign is not None and v.presign.tie == "gt":
            return sign_gt
        return "ste_sign"


def sign_gt(z):
    """larq input quantizer for tie gt: +1 where z > 0, else −1 (LCE makes it GREATER → LceQuantize)."""
    return tf.where(tf.greater(z, 0.0), 1.0, -1.0)


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
    "Max": lambda a, c: tf.maximum(a, c), "Min": lambda a, c: tf.minimum(a, c)}


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
        a, c = b.to_canonical(b.materialize(a)), b.to_canonical(b.materialize(c))
        if a.layout != c.layout or a.shape != c.shape:
            raise UnsupportedLayer(node.name, f"{node.op_type} of tensors shaped {a.shape} and {c.shape}")
        t = b.lam(lambda zs: op(zs[0], zs[1]), [a.tensor, c.tensor], node.name or node.op_type)
        return [Val(t, a.shape, a.layout, source=a.source)]
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
    alpha = float(_attr(node, "alpha", 0.01))
    return [replace(x, tensor=b.lam(lambda z: tf.nn.leaky_relu(z, alpha), x.tensor, node.name or "leaky_relu"))]


def _softmax(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """Softmax / LogSoftmax over one axis of the PyTorch tensor, applied where that axis is stored."""
    x = b.to_canonical(b.real(node.inputs[0]))
    rank = len(x.shape) + 1
    axis = int(_attr(node, "axis", -1)) % rank
    if axis == 0:
        raise UnsupportedLayer(node.name, f"{node.op_type} over the batch")
    stored = {1: 3, 2: 1, 3: 2}[axis] if x.layout == "nhwc" else axis
    fn = tf.nn.softmax if node.op_type == "Softmax" else tf.nn.log_softmax
    return [replace(x, tensor=b.lam(lambda z: fn(z, axis=stored), x.tensor, node.name or node.op_type))]


def _transpose(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """A permutation of the per-sample axes (the batch stays first), on the PyTorch tensor."""
    x = b.to_plain(b.real(node.inputs[0]))
    perm = [int(p) for p in _attr(node, "perm", list(range(len(x.shape), -1, -1)))]
    if not perm or perm[0] != 0:
        raise UnsupportedLayer(node.name, f"Transpose {perm} moves the batch axis")
    t = b.lam(lambda z: tf.transpose(z, perm), x.tensor, node.name or "transpose")
    return [b.to_canonical(Val(t, tuple(x.shape[p - 1] for p in perm[1:]), "plain", presign=x.presign))]


def _identity(b: KerasBuilder, node: ir.Node) -> list[Val]:
    return [b.get(node.inputs[0])]


def _shape_only(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """Shape arithmetic on the batch size (the exporter's dynamic-batch flatten and zeros): not needed in Keras."""
    data = [b.get(v) for v in node.inputs if v is not None]
    if node.op_type == "ConstantOfShape":  # zeros shaped [batch, …]: a batch-broadcast constant
        fill = node.attributes.get("value")
        value = fill.value.numpy().reshape(()) if fill is not None else np.zeros((), np.float32)
        return [Val(const=np.full((1,) + _static_shape(node.outputs[0]), value, dtype=np.float32))]
    if node.op_type == "Shape" or any(v.shape_only for v in data) and all(v.tensor is None for v in data):
        return [Val(shape_only=True) for _ in node.outputs]
    if node.op_type in ("Reshape", "Squeeze", "Unsqueeze"):
        return _reshape(b, node)
    if node.op_type == "Concat":
        return _concat(b, node)
    raise UnsupportedLayer(node.name, f"{node.op_type} on tensors is not supported")


def _reshape(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """Reshape, Flatten, Squeeze, Unsqueeze: the output's static shape says what to do."""
    x = b.get(node.inputs[0])
    if x.tensor is None:
        if x.const is not None:
            raise UnsupportedLayer(node.name, "reshape of a constant that capture did not fold")
        return [Val(shape_only=True)]
    out_shape = _reshape_target(b, node, x)
    if out_shape == x.shape:
        return [x]
    if len(out_shape) == 1 and int(np.prod(x.shape)) == out_shape[0]:
        if x.layout == "nhwc":  # flatten: keep NHWC storage; consumers permute their weights
            return [Val(x.tensor, out_shape, "nhwc_flat", presign=x.presign, source=x.shape)]
        if x.layout == "nhwc_flat":
            return [replace(x, shape=out_shape)]
    if len(out_shape) == 3 and x.layout == "nhwc_flat" and tuple(out_shape) == x.source:
        return [Val(x.tensor, out_shape, "nhwc", presign=x.presign)]
    p = b.to_plain(x)
    t = b.reshape(p.tensor, out_shape, node.name or "reshape")
    return [b.to_canonical(Val(t, out_shape, "plain", presign=x.presign))]


def _reshape_target(b: KerasBuilder, node: ir.Node, x: Val) -> tuple[int, ...]:
    """The PyTorch shape (without the batch) a Reshape/Flatten/Squeeze/Unsqueeze produces."""
    size = int(np.prod(x.shape))
    if node.op_type == "Flatten":
        axis = int(_attr(node, "axis", 1))
        if axis != 1:
            raise UnsupportedLayer(node.name, f"Flatten with axis {axis}")
        return (size,)
    shape = node.outputs[0].shape
    if shape is not None and len(shape) and all(isinstance(d, int) for d in list(shape)[1:]):
        return _static_shape(node.outputs[0])
    target = b.get(node.inputs[1]).const if node.op_type == "Reshape" and len(node.inputs) > 1 else None
    if target is None and node.op_type == "Reshape" and len(node.inputs) > 1:
        target = _batch_then_constants(b, node.inputs[1])
    if target is None or target.ndim != 1 or len(target) < 1:
        raise UnsupportedLayer(node.name, f"{node.op_type} to a shape the IR does not know")
    dims = [x.shape[i - 1] if d == 0 and 0 < i <= len(x.shape) else int(d) for i, d in enumerate(target)][1:]
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1]))
        dims[dims.index(-1)] = size // known
    return tuple(dims)


def _batch_then_constants(b: KerasBuilder, value: ir.Value | None) -> np.ndarray | None:
    """A traced ``view(x.size(0), ...)``: Concat(the batch size, constants) → [batch, constants...]."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Concat" or not producer.inputs:
        return None
    parts = [b.get(v) for v in producer.inputs]
    if not parts[0].shape_only or any(p.const is None for p in parts[1:]):
        return None
    return np.concatenate([[-2]] + [np.asarray(p.const).reshape(-1) for p in parts[1:]]).astype(np.int64)


def _concat(b: KerasBuilder, node: ir.Node) -> list[Val]:
    vals = [b.to_canonical(b.real(v)) for v in node.inputs]
    axis = int(_attr(node, "axis", 1))
    rank = len(vals[0].shape) + 1
    axis = axis % rank
    layouts = {v.layout for v in vals}
    if len(layouts) != 1:
        raise UnsupportedLayer(node.name, "Concat of tensors in different layouts")
    keras_axis = {1: 3, 2: 1, 3: 2}[axis] if "nhwc" in layouts else axis
    t = keras.layers.Concatenate(axis=keras_axis, name=b.name(node.name or "concat"))([v.tensor for v in vals])
    return [Val(t, _torch_shape(t, vals[0].layout), vals[0].layout)]


def _expand(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.get(node.inputs[0])
    out_shape = _static_shape(node.outputs[0])
    if x.tensor is None and x.const is not None:  # zeros for the initial state: a batch-broadcast constant
        out = np.broadcast_to(x.const, (1,) + out_shape).astype(np.float32)
        return [Val(const=out, shape=out.shape)]
    if x.shape == out_shape:
        return [x]
    raise UnsupportedLayer(node.name, f"Expand of a computed tensor to {out_shape}")


def _conv(b: KerasBuilder, node: ir.Node) -> list[Val]:
    name = layer_name(node)
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 4:
        raise UnsupportedLayer(name, "only 2-D convolutions with constant weights are supported")
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedLayer(name, "auto_pad is not supported")
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    x = b.to_canonical(b.real(node.inputs[0]))
    top, left, bottom, right = (int(p) for p in _attr(node, "pads", [0, 0, 0, 0]))
    stride, dilation = tuple(_attr(node, "strides", [1, 1])), tuple(_attr(node, "dilations", [1, 1]))
    _, h, w = x.shape
    bottom = trim_padding(h, weight.shape[2], stride[0], top, bottom, dilation[0])
    right = trim_padding(w, weight.shape[3], stride[1], left, right, dilation[1])
    t = x.tensor
    if top or left or bottom or right:
        t = keras.layers.ZeroPadding2D(((top, bottom), (left, right)), name=b.name(f"{name}_pad"))(t)
    y, kind = b.conv2d(t, weight, bias, stride, int(_attr(node, "group", 1)), name, dilation)
    binary = is_binary_weight(weight)
    b.layers.append(EmittedLayer(name, kind, binary, int(weight.size),
                                 "input is real-valued; LCE packs ±1 inputs only" if binary and b.bitpacked else ""))
    return [Val(y, _torch_shape(y, "nhwc"), "nhwc")]


def _gemm(b: KerasBuilder, node: ir.Node) -> list[Val]:
    name = layer_name(node)
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 2:
        raise UnsupportedLayer(name, "only dense layers with constant 2-D weights are supported")
    if node.op_type == "Gemm":
        if int(_attr(node, "transA", 0)):
            raise UnsupportedLayer(name, "Gemm with transA")
        weight = weight if int(_attr(node, "transB", 0)) else weight.T
        weight = weight * np.float32(_attr(node, "alpha", 1.0)) if float(_attr(node, "alpha", 1.0)) != 1.0 else weight
    else:
        weight = weight.T
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if bias is not None and float(_attr(node, "beta", 1.0)) != 1.0:
        bias = bias * np.float32(_attr(node, "beta", 1.0))
    if bias is not None and bias.size != weight.shape[0]:
        raise UnsupportedLayer(name, f"bias of shape {bias.shape} for {weight.shape[0]} outputs")
    x = b.real(node.inputs[0])
    if len(x.shape) != 1:
        raise UnsupportedLayer(name, f"dense layer over a {len(x.shape) + 1}-D input")
    binary = is_binary_weight(weight)
    if b.bitpacked and binary:  # keep BNN graphs free of FULLY_CONNECTED; a float 1×1 conv holds the same weights
        y, kind = b.dense_as_conv(x, weight, bias, name)
        note = "input is real-valued; LCE packs ±1 inputs only (a float conv, no FULLY_CONNECTED)"
    else:
        y, kind = b.dense(x, weight, bias, name)
        note = ""
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
    layer = keras.layers.BatchNormalization(axis=-1, epsilon=float(_attr(node, "epsilon", 1e-5)),
                                              name=b.name(node.name or "batchnorm"))
    y = layer(x.tensor)
    layer.set_weights([p.astype(np.float32) for p in params])  # type: ignore[union-attr]
    return [replace(x, tensor=y)]


def _maxpool(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.to_canonical(b.get(node.inputs[0]))  # pre-sign values pass: max commutes with sign
    if len(x.shape) != 3 or int(_attr(node, "ceil_mode", 0)) or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
        raise UnsupportedLayer(node.name, "only 2-D max pooling without ceil_mode or dilation is supported")
    top, left, bottom, right = (int(p) for p in _attr(node, "pads", [0, 0, 0, 0]))
    t = x.tensor
    if top or left or bottom or right:
        t = b.pad_nhwc(t, top, bottom, left, right, float("-inf"), f"{node.name}_pad")
    kernel = tuple(_attr(node, "kernel_shape", [1, 1]))
    y = keras.layers.MaxPool2D(kernel, strides=tuple(_attr(node, "strides", kernel)), padding="valid",
                               name=b.name(node.name or "maxpool"))(t)
    return [replace(x, tensor=y, shape=_torch_shape(y, "nhwc"))]


def _averagepool(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.to_canonical(b.real(node.inputs[0]))
    if any(_attr(node, "pads", [0, 0, 0, 0])) or int(_attr(node, "ceil_mode", 0)):
        raise UnsupportedLayer(node.name, "average pooling with padding or ceil_mode is not supported")
    kernel = tuple(_attr(node, "kernel_shape", [1, 1]))
    y = keras.layers.AveragePooling2D(kernel, strides=tuple(_attr(node, "strides", kernel)), padding="valid",
                                      name=b.name(node.name or "avgpool"))(x.tensor)
    return [replace(x, tensor=y, shape=_torch_shape(y, "nhwc"))]


def _global_pool(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.to_canonical(b.real(node.inputs[0]))
    reduce = tf.reduce_mean if node.op_type == "GlobalAveragePool" else tf.reduce_max
    y = b.lam(lambda z: reduce(z, axis=[1, 2], keepdims=True), x.tensor, node.name or node.op_type)
    return [Val(y, _torch_shape(y, "nhwc"), "nhwc")]


def _reduce(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """ReduceMean / ReduceMax over constant axes (opset 18: axes as an input)."""
    x = b.real(node.inputs[0])
    axes_arr = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    rank = len(x.shape) + 1
    axes = sorted(int(a) % rank for a in (axes_arr if axes_arr is not None else range(rank)))
    keep = bool(_attr(node, "keepdims", 1))
    if 0 in axes:
        raise UnsupportedLayer(node.name, "reduction over the batch dimension")
    x = b.to_canonical(x)
    if x.layout == "nhwc":  # PyTorch axis → NHWC axis
        axes = sorted({1: 3, 2: 1, 3: 2}[a] for a in axes)
        if not keep and axes != [1, 2]:
            x, axes = b.to_plain(x), sorted(int(a) % rank for a in axes_arr)  # type: ignore[union-attr]
    reduce = tf.reduce_mean if node.op_type == "ReduceMean" else tf.reduce_max
    y = b.lam(lambda z: reduce(z, axis=axes, keepdims=keep), x.tensor, node.name or node.op_type)
    layout = x.layout if keep else "plain"
    return [Val(y, _torch_shape(y, layout), layout)]


def _pad(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.to_canonical(b.get(node.inputs[0]))
    pads = const_array(node.inputs[1])
    value_arr = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(())
    if _attr(node, "mode", "constant") != "constant" or pads is None or value_arr is None or len(x.shape) != 3 \
            or len(pads) != 8 or pads[0] or pads[1] or pads[4] or pads[5]:
        raise UnsupportedLayer(node.name, "only constant spatial padding of 4-D tensors is supported")
    value = float(value_arr.reshape(()))
    if x.presign is not None and abs(value) != 1.0:
        x = b.materialize(x)  # only ±1 padding commutes with sign
    top, left, bottom, right = int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])
    conv = _only_conv_consumer(node)
    if conv is not None:  # see trim_padding: LCE would otherwise fuse PyTorch's (1, 1) at stride 2 wrongly
        kernel = _attr(conv, "kernel_shape", None) or const_array(conv.inputs[1]).shape[2:]  # type: ignore[union-attr]
        (kh, kw), (sh, sw) = tuple(kernel), tuple(_attr(conv, "strides", [1, 1]))
        (dh, dw), (_, h, w) = tuple(_attr(conv, "dilations", [1, 1])), x.shape
        bottom, right = trim_padding(h, kh, sh, top, bottom, dh), trim_padding(w, kw, sw, left, right, dw)
    t = b.pad_nhwc(x.tensor, top, bottom, left, right, value, node.name or "pad")
    return [replace(x, tensor=t, shape=_torch_shape(t, "nhwc"))]


def _only_conv_consumer(node: ir.Node) -> ir.Node | None:
    """The Conv (without padding of its own) that alone reads ``node``'s output, if that is the case."""
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        return None
    conv = uses[0].node
    if conv.domain != "" or conv.op_type != "Conv" or any(_attr(conv, "pads", [0, 0, 0, 0])):
        return None
    weight = const_array(conv.inputs[1])
    if "kernel_shape" not in conv.attributes and (weight is None or weight.ndim != 4):
        return None
    return conv


def _step(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """htaf.Heaviside / htaf.Sign: x ≥ t (x > t for tie gt). In bit-packed builds a Sign stays pre-sign,
    y = x − t, for the next binary layer's quantizer: x − t ≥ 0 ⇔ x ≥ t exactly in IEEE arithmetic."""
    x = b.materialize(b.get(node.inputs[0]))
    threshold = const_array(node.inputs[1])
    if x.tensor is None or threshold is None:
        raise UnsupportedLayer(node.name, "step of a constant or with a computed threshold")
    tie = node.attributes["tie"].as_string()
    levels = "pm1" if node.op_type == "Sign" else "01"
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


def _binary(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """A fused binary layer (see tflite_binary): larq QuantConv2D when LCE can bit-pack it, else a float conv."""
    layer: BinaryLayer = node.meta["binary"]
    x = b.get(node.inputs[0])
    weight, bias = layer.folded_weight(), layer.folded_bias()
    if layer.kind == "dense":
        plan = plan_lce(layer) if b.bitpacked else FLOAT_PLAN
        if plan.packed:
            y, kind = b.dense_as_conv(x, weight, bias, layer.name, quantizer=b.quantizer(x))
        elif layer.scale is not None:  # as a conv, so that the depthwise op below applies to its output
            y, kind = b.dense_as_conv(b.materialize(x), weight, bias, layer.name)
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
        if layer.scale is None:
            return [y]
        # y = scale·v + shift as a 1×1 depthwise conv: LCE does not fold it into the binary op (see tflite_binary)
        make = lambda: keras.layers.DepthwiseConv2D(1, use_bias=True, name=b.name(f"{layer.name}_affine"))  # noqa: E731
        t = b.apply(make, y.tensor, [layer.scale.reshape(1, 1, -1, 1), layer.shift], f"affine:{layer.name}")
        return [replace(y, tensor=t)]
    # y = flip·v − T + ½ is never 0 and its sign is the step (see tflite_binary).
    presign = replace(y, presign=Presign(layer.levels or "pm1", "ge"))
    out = presign if (b.bitpacked and layer.levels == "pm1") else b.materialize(presign)
    return [b.record_step(layer.step or node.outputs[0].name, out)]


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
        make = lambda: _larq().layers.QuantConv2D(  # noqa: E731
            weight.shape[0], weight.shape[2:], strides=layer.stride, padding=padding, pad_values=pad_values,
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


EMITTERS: dict[tuple[str, str], Callable[[KerasBuilder, ir.Node], list[Val]]] = {
    ("", "Conv"): _conv,
    ("", "Gemm"): _gemm,
    ("", "MatMul"): _gemm,
    ("", "BatchNormalization"): _batchnorm,
    ("", "MaxPool"): _maxpool,
    ("", "AveragePool"): _averagepool,
    ("", "GlobalAveragePool"): _global_pool,
    ("", "GlobalMaxPool"): _global_pool,
    ("", "Pad"): _pad,
    ("", "ReduceMean"): _reduce,
    ("", "ReduceMax"): _reduce,
    ("", "Flatten"): _reshape,
    ("", "Identity"): _identity,
    ("", "Expand"): _expand,
    ("", "Clip"): _clip,
    ("", "LeakyRelu"): _leaky_relu,
    ("", "Softmax"): _softmax,
    ("", "LogSoftmax"): _softmax,
    ("", "Transpose"): _transpose,
    **{("", op): _elementwise for op in BINARY_OPS},
    **{("", op): _unary for op in UNARY_OPS},
    **{("", op): _shape_only for op in SHAPE_OPS},
    (HTAF_DOMAIN, "Heaviside"): _step,
    (HTAF_DOMAIN, "Sign"): _step,
    (BINARY_DOMAIN, BINARY_OP): _binary,
}
