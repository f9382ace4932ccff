"""Binary layers: find ±1-weight convs and dense layers over ±1 activations, and fold what follows them.

The pattern, in the IR that capture writes::

    htaf.Sign ─[MaxPool | Reshape | Flatten | Identity | Pad(±1)]*─▶ [Pad(p)] ▶ Conv(W ∈ {±1}) | Gemm(·, W ∈ {±1})
              ─[Add | Sub | Mul | Div by per-channel constants | BatchNormalization]*─▶ [htaf.Sign | htaf.Heaviside]

**Threshold mode** (the chain ends in a step). With ±1 inputs and ±1 weights the pre-activation v is an
integer in [−K, K], K the fan-in, so everything after the conv is a function of v alone. Evaluating
that chain with torch on every integer of [−K, K] — the very float32 operations the reference runs,
ties included — gives for each output channel a rule "fires iff flip·v ≥ T" (flip = −1 where the
chain decreases, e.g. a negative batch-norm scale). A conv with kernel flip·W and bias −(T − ½) has an
output y = flip·v − T + ½ that is never 0 and whose sign is the step, so the layer is exact by
construction, whatever the tie rule, scale or batch-norm parameters. LCE turns such a layer into an
``LceBconv2d`` whose output thresholds are these integers, writing bit-packed activations when the next
layer is binary.

**Affine mode** (anything else follows, e.g. the last layer's batch norm): the per-channel ops after the
conv become one y = scale·v + shift, applied by a separate 1×1 depthwise conv to the exact integers the
binary layer writes. (Fused into ``LceBconv2d``, LCE computes it as (shift + K·m) − 2·popcount·m, whose
cancellation costs about K·|m| ulps, 1e-4 and more for real layers; folded into float weights by the
TFLite converter, the sum is no longer exact.)

Each match replaces its nodes by one node ``htaf.tflite::BinaryConv`` whose output keeps the name of the
value it replaces (the step tensor in threshold mode), with the frozen :class:`BinaryLayer` in
``node.meta["binary"]``. A binary-weight layer that does not match says why (:class:`Rejected`), for the
export summary. Whether LCE can run a layer bit-packed is decided where its input size is certain, by
:func:`lce_plan.plan_lce`, which returns an :class:`lce_plan.LcePlan`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from htaf_export.passes.base import PassReport, report
from htaf_export.passes.util import attr, const_array, is_step, layer_of, layer_of_node, sign_factor

from .integer_thresholds import compose_affine, follow_chain, integer_thresholds

DOMAIN = "htaf.tflite"
OP = "BinaryConv"
COPYING_PADS = ("reflect", "edge", "wrap")  # padding_mode reflect, replicate, circular
PASSTHROUGH = ("MaxPool", "Reshape", "Flatten", "Identity", "Transpose", "Squeeze", "Unsqueeze", "Slice",
               "Gather")  # outputs hold values of the first input only


def copies_values(node: ir.Node) -> bool:
    """An op whose outputs hold only values of its input (so a step's levels pass through it)."""
    return node.domain == "" and (node.op_type in PASSTHROUGH or
                                  node.op_type == "Resize" and attr(node, "mode", "nearest") == "nearest" or
                                  node.op_type == "Pad" and attr(node, "mode", "constant") in COPYING_PADS)


@dataclass(frozen=True)
class Padding:
    """Spatial padding of a conv input: rows/columns added before and after, and the value padded."""

    top: int
    bottom: int
    left: int
    right: int
    value: float

    @property
    def any(self) -> bool:
        return bool(self.top or self.bottom or self.left or self.right)


@dataclass(frozen=True)
class BinaryLayer:
    """One binary conv (``kind`` "conv") or dense layer ("dense") and how it is emitted.

    ``weight`` is ±1, OIHW for convs, [out, in] for dense layers. In threshold mode the layer writes the
    step ``step``: channel c fires iff flip[c]·v ≥ threshold[c], v being the integer pre-activation.
    """

    name: str
    kind: str
    weight: np.ndarray
    mode: str  # "threshold" or "affine"
    fan_in: int
    stride: tuple[int, int] = (1, 1)
    padding: Padding | None = None
    input_hw: tuple[int, int] | None = None
    group: int = 1
    dilation: tuple[int, int] = (1, 1)
    weight_scale: np.ndarray | None = None  # the real weights are weight·weight_scale (per output channel)
    bias: np.ndarray | None = None  # affine mode: the conv's own bias (when no chain follows)
    scale: np.ndarray | None = None  # affine mode: the chain after the conv as y = scale·v + shift
    shift: np.ndarray | None = None
    flip: np.ndarray | None = None
    threshold: np.ndarray | None = None
    step: str | None = None
    levels: str | None = None  # "pm1" (Sign) or "01" (Heaviside)
    tie: str | None = None
    notes: tuple[str, ...] = ()
    chained: bool = False  # affine mode: per-channel ops followed the conv (else scale/shift are its weight scale/bias)

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "dense") or self.mode not in ("threshold", "affine"):
            raise ValueError(f"binary layer {self.name!r}: kind {self.kind!r}, mode {self.mode!r}")
        if self.mode == "threshold" and (self.flip is None or self.threshold is None or self.step is None):
            raise ValueError(f"binary layer {self.name!r}: threshold mode needs flip, threshold and step")

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def folded_bias(self) -> np.ndarray | None:
        """The conv bias that makes y = flip·v + bias have the step's sign (threshold mode)."""
        if self.mode != "threshold":
            return self.bias
        return (0.5 - self.threshold).astype(np.float32)

    def folded_weight(self) -> np.ndarray:
        """±1 weights with each output channel multiplied by its flip (threshold mode)."""
        if self.flip is None:
            return self.weight
        shape = (-1,) + (1,) * (self.weight.ndim - 1)
        return (self.weight * self.flip.reshape(shape)).astype(np.float32)


@dataclass(frozen=True)
class Rejected:
    """A layer with ±1 weights that is not emitted as a binary layer, and why."""

    name: str
    reason: str


def layer_name(node: ir.Node) -> str:
    """The module path of a conv/dense node, read off its weight initializer (``layers.conv2.weight``)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is not None and weight.name and not weight.name.startswith("onnx::"):
        return layer_of(weight.name)
    return layer_of_node(str(node.name or "")) or (weight.name if weight is not None and weight.name else "") \
        or str(node.name)


def is_binary_weight(array: np.ndarray | None) -> bool:
    return array is not None and array.dtype == np.float32 and array.size > 0 and bool(np.all(np.abs(array) == 1.0))


def _pad_spec(node: ir.Node) -> tuple[list[int], float] | None:
    """(pads, value) of a constant-mode Pad with constant pads, else None."""
    if node.op_type != "Pad" or node.domain != "" or attr(node, "mode", "constant") != "constant":
        return None
    pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    value = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(())
    if pads is None or value is None or value.size != 1 or (len(node.inputs) > 3 and node.inputs[3] is not None):
        return None
    return [int(p) for p in pads], float(value.reshape(()))


LCE_LEVELS = ("pm1",)  # LCE packs ±1 activations only
INTEGER_LEVELS = ("pm1", "01")  # integer targets take {0, 1} activations too


def input_levels(value: ir.Value | None) -> str | None:
    """"pm1" or "01" when ``value`` holds step activations (±1 or 0/1), seen through ops that keep them
    (pooling, reshapes, padding with a level value); None otherwise."""
    while value is not None:
        node = value.producer()
        if node is None:
            return None
        if is_step(node):
            return "pm1" if node.op_type == "Sign" else "01"
        if node.domain == DOMAIN and node.op_type == OP:
            layer: BinaryLayer = node.meta["binary"]
            return layer.levels if layer.mode == "threshold" else None
        pad = _pad_spec(node)
        if copies_values(node):
            value = node.inputs[0]
            continue
        if node.domain == "" and node.op_type == "Concat":  # a U-Net's skip joined to its upsampled path
            found = {input_levels(v) for v in node.inputs}
            return found.pop() if len(found) == 1 else None
        if pad is not None:
            levels = input_levels(node.inputs[0])
            return levels if levels is not None and pad[1] in LEVEL_VALUES[levels] else None
        return None
    return None


LEVEL_VALUES = {"pm1": (-1.0, 1.0), "01": (0.0, 1.0)}


def is_pm1(value: ir.Value | None) -> bool:
    """Whether ``value`` holds ±1 activations: a Sign step seen through ops that commute with sign."""
    return input_levels(value) == "pm1"


def trim_padding(size: int, kernel: int, stride: int, before: int, after: int, dilation: int = 1) -> int:
    """``after`` without the trailing rows no output reads (exact). With it trimmed, a pad the converters
    fuse into a SAME conv is always TF's SAME split: LCE's pad fusion checks only the output size and the
    before/after ratio, and would otherwise turn PyTorch's pad (1, 1) at stride 2 into TF's (0, 1)."""
    span = dilation * (kernel - 1) + 1
    out = (size + before + after - span) // stride + 1
    last_read = (out - 1) * stride + span - 1
    return max(after - (size + before + after - 1 - last_read), 0)


def _conv_layer(node: ir.Node, weight: np.ndarray) -> tuple[BinaryLayer, list[ir.Node], ir.Value] | str:
    """The conv as a layer, with the Pad in front of it when it pads (only) the conv's input."""
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "auto_pad is not supported"
    x = node.inputs[0]
    absorbed = [node]
    pads = [int(p) for p in attr(node, "pads", [0, 0, 0, 0])]
    padding = Padding(pads[0], pads[2], pads[1], pads[3], 0.0)
    producer = x.producer()
    spec = _pad_spec(producer) if producer is not None else None
    if spec is not None and not padding.any and len(x.uses()) == 1 and not x.is_graph_output():
        p, value = spec
        if len(p) == 8 and p[0] == p[1] == p[4] == p[5] == 0:
            padding = Padding(p[2], p[6], p[3], p[7], value)
            absorbed.insert(0, producer)
            x = producer.inputs[0]
    hw = _hw(x)
    if hw is None and len(absorbed) == 2:  # traced programs may leave the Pad's input unshaped; its output is not
        padded = _hw(node.inputs[0])
        hw = (padded[0] - padding.top - padding.bottom, padded[1] - padding.left - padding.right) if padded else None
    stride = tuple(int(s) for s in attr(node, "strides", [1, 1]))
    dilation = tuple(int(d) for d in attr(node, "dilations", [1, 1]))
    layer = BinaryLayer(layer_name(node), "conv", weight, "affine", int(np.prod(weight.shape[1:])),
                        stride, padding, None, int(attr(node, "group", 1)), dilation)  # type: ignore[arg-type]
    return (with_input_size(layer, hw) if hw is not None else layer), absorbed, x


def with_input_size(layer: BinaryLayer, hw: tuple[int, int]) -> BinaryLayer:
    """``layer`` once its input's (H, W) is known: trailing padding no output reads is trimmed (exact)."""
    pad = layer.padding
    if pad is not None:
        kh, kw = layer.weight.shape[2], layer.weight.shape[3]
        pad = replace(pad, bottom=trim_padding(hw[0], kh, layer.stride[0], pad.top, pad.bottom, layer.dilation[0]),
                      right=trim_padding(hw[1], kw, layer.stride[1], pad.left, pad.right, layer.dilation[1]))
    return replace(layer, padding=pad, input_hw=hw)


def _hw(value: ir.Value) -> tuple[int, int] | None:
    """Static (H, W) of an NCHW value, if the IR knows them."""
    dims = list(value.shape)[2:4] if value.shape is not None else []
    return (int(dims[0]), int(dims[1])) if len(dims) == 2 and all(isinstance(d, int) for d in dims) else None


def _dense_layer(node: ir.Node, weight: np.ndarray) -> tuple[BinaryLayer, list[ir.Node], ir.Value] | str:
    """The dense layer (``weight`` already [out, in]) as a layer."""
    if node.op_type == "Gemm" and (int(attr(node, "transA", 0)) or float(attr(node, "alpha", 1.0)) != 1.0
                                   or float(attr(node, "beta", 1.0)) != 1.0):
        return "Gemm with transA, or alpha/beta other than 1, is not supported"
    return BinaryLayer(layer_name(node), "dense", weight, "affine", int(weight.shape[1])), [node], node.inputs[0]


def match(node: ir.Node, bitpacked: bool, levels: tuple[str, ...] = LCE_LEVELS
          ) -> tuple[BinaryLayer, list[ir.Node], ir.Value] | Rejected | None:
    """The binary layer rooted at ``node``, the nodes it replaces (in order) and the value it writes; or why not.

    None when ``node`` is not a conv/dense layer with ±1 weights (times a positive per-channel scale), or
    when the pattern brings nothing (a bare ±1 layer on the float target, which is exact op by op).
    """
    if node.domain != "" or node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != (4 if node.op_type == "Conv" else 2):
        return None
    if node.op_type == "MatMul" or node.op_type == "Gemm" and not int(attr(node, "transB", 0)):
        weight = np.ascontiguousarray(weight.T)  # [out, in]
    factor = sign_factor(weight, 0)
    if factor is None:
        return None
    made = _conv_layer(node, weight) if node.op_type == "Conv" else _dense_layer(node, weight)
    if isinstance(made, str):
        return Rejected(layer_name(node), made)
    layer, absorbed, source = made
    layer = replace(layer, weight=factor[0], weight_scale=factor[1])
    if input_levels(source) not in levels:
        padded = source.producer() is not None and _pad_spec(source.producer()) is not None \
            and input_levels(source.producer().inputs[0]) is not None
        if padded:  # PyTorch writes padding='same' with an even kernel as a Pad before the conv
            return Rejected(layer.name, "its input is padded by a separate Pad op (padding='same' with an even "
                                        "kernel) with a value that is not one of its steps' levels")
        return Rejected(layer.name, "input is real-valued; LCE packs ±1 inputs only" if levels == LCE_LEVELS
                        else "input is real-valued, not step activations")
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    bias = bias if bias is not None and np.any(bias) else None
    rank = 4 if layer.kind == "conv" else 2
    chain, step = follow_chain(node.outputs[0], layer.out_channels, rank)
    if step is not None:
        found = integer_thresholds(chain, step, bias, layer.fan_in, layer.out_channels, rank, layer.weight_scale)
        if not isinstance(found, str):
            written, tie = ("pm1" if step.op_type == "Sign" else "01"), step.attributes["tie"].as_string()
            before = "batch norm + " if any(n.op_type == "BatchNormalization" for n, _ in chain) else \
                "affine + " if chain or layer.weight_scale is not None else ""
            note = f"{before}{'sign' if written == 'pm1' else 'step'} → integer thresholds (tie {tie}, exact)"
            layer = replace(layer, mode="threshold", flip=found[0], threshold=found[1], step=step.outputs[0].name,
                            levels=written, tie=tie, notes=(note,))
            return _noted(layer, bitpacked, levels), absorbed + [n for n, _ in chain] + [step], step.outputs[0]
        layer = replace(layer, notes=(found,))
    if not (bitpacked or chain or layer.weight_scale is not None):
        return None  # a float conv of ±1 values is exact already
    # Folded into the layer, these ops lose precision: LceBconv2d computes (bias + K·m) − 2·popcount·m,
    # which cancels for large fan-ins, and TFLite scales the weights. The layer writes the exact integers
    # instead, and one per-channel op follows.
    if chain or layer.weight_scale is not None:
        scale, shift = compose_affine(chain, bias, layer.out_channels, rank, layer.weight_scale)
        layer = replace(layer, scale=scale, shift=shift, chained=bool(chain))
        out = chain[-1][0].outputs[0] if chain else node.outputs[0]
        return _noted(layer, bitpacked, levels), absorbed + [n for n, _ in chain], out
    return _noted(replace(layer, bias=bias), bitpacked, levels), absorbed, node.outputs[0]


def _noted(layer: BinaryLayer, bitpacked: bool, levels: tuple[str, ...]) -> BinaryLayer:
    if bitpacked and levels == LCE_LEVELS and layer.kind == "dense":
        return replace(layer, notes=layer.notes + ("dense as a binary conv (LCE keeps QuantDense float)",))
    return layer


class FuseBinaryLayers(ir.passes.InPlacePass):
    """Replace each binary layer by one ``htaf.tflite::BinaryConv`` node, in graph order (so a layer sees the
    layers before it already fused). Records the layers; refusals name the ±1 layers left as they were."""

    def __init__(self, bitpacked: bool, levels: tuple[str, ...] = LCE_LEVELS) -> None:
        super().__init__()
        self.bitpacked = bitpacked
        self.levels = levels

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        layers: list[BinaryLayer] = []
        rejected: list[tuple[str, str]] = []
        for node in list(graph):
            if node.graph is None:  # removed by an earlier match
                continue
            found = match(node, self.bitpacked, self.levels)
            if found is None:
                continue
            if isinstance(found, Rejected):
                rejected.append((found.name, found.reason))
                continue
            layer, absorbed, out = found
            source = absorbed[0].inputs[0]
            fused = ir.node(OP, [source], domain=DOMAIN, name=f"{layer.name}/binary")
            fused.meta["binary"] = layer
            ir.convenience.replace_nodes_and_values(graph, absorbed[-1], absorbed, [fused], [out], [fused.outputs[0]])
            layers.append(layer)
        return report(model, layers, refusals=rejected)
