"""``tflite-int8`` target: the ``tflite-float`` file with its threshold binary layers as builtin int8 ops.

The float file writes a binary layer that ends in a step as ``CONV_2D`` or ``FULLY_CONNECTED`` (weights
flip·W ∈ {±1}) whose only
reader compares it with per-channel constants (``GREATER_EQUAL``/``GREATER``; the TensorFlow converter may
have moved the bias into the comparison), then ``SELECT_V2``/``CAST``. Each such conv whose input is step
activations (±1 or {0, 1}: a select or cast of a comparison, seen through pads with level values, max pools
and reshapes) becomes

    QUANTIZE(x → int8, scale 1, zero point 0)  →  CONV_2D / FULLY_CONNECTED int8 (weights ±1 with scale 1, per
    channel for convs; bias −t int32; output scale 1, zero point 0)  →  DEQUANTIZE  →  GREATER_EQUAL(·, 0)

t is, per channel, the smallest integer sum v for which the float file's own float32 arithmetic,
fl(v + bias) compared with the constant, fires — found by evaluating it on every v in [−K, K], K the fan-in.

Why it is exact: x is ±1 or {0, 1}, so quantizing it with scale 1 is exact, and zero padding pads with the zero
point, the real 0; the int32 accumulator is v − t exactly; with every scale 1 the requantization multiplier is
exactly 1.0, and saturation to [−128, 127] keeps the sign, so out ≥ 0 ⟺ v ≥ t ⟺ the float file's step fires,
for every reachable v. Everything else stays as in ``tflite-float`` (convs TFLite splits, such as dilated
ones, stay float); the step tensors are the same selects, so locating and validating them is unchanged. The
stock interpreter (XNNPACK) runs the file. An int8 ``GREATER_EQUAL`` would save the ``DEQUANTIZE``, but the
TFLite 2.19 interpreter aborts on it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from htaf_export import tflite_file as tfl
from htaf_export.capture import Capture
from htaf_export.contracts import Conversion, LayerRow
from htaf_export.targets import ExportOptions

from .tflite import convert as convert_tflite

LEVEL_PAIRS = ({1.0, -1.0}, {1.0, 0.0})
# values of input 0 only (PAD adds zeros, which int8 holds exactly and the float file sums as the int8 conv does)
PASSTHROUGH = ("MAX_POOL_2D", "RESHAPE", "MIRROR_PAD", "STRIDED_SLICE", "GATHER", "RESIZE_NEAREST_NEIGHBOR", "PAD")
# operator versions for int8 operands (TFLite's op version table)
INT8_VERSIONS = {"CONV_2D": 3, "FULLY_CONNECTED": 4, "QUANTIZE": 2, "DEQUANTIZE": 2}
LAYERS = ("CONV_2D", "FULLY_CONNECTED")


def convert(capture: Capture, provenance: Mapping[str, str], options: ExportOptions) -> Conversion:
    """The target's contract: the float TFLite file, then its threshold binary convs in int8."""
    base = convert_tflite(capture, provenance, bitpacked=False)
    data, converted = quantize_threshold_convs(base.data)
    keras_names = {name.split(";")[0].split("/")[1] if "/" in name else name: numel for name, numel in converted.items()}
    rows = [LayerRow(r.layer, f"int8 {r.became.split(' ')[0]} (threshold)", r.note)
            if r.layer.replace(".", "_") in keras_names else r for r in base.rows]
    notes = base.notes + (() if converted else (
        "no binary conv ending in a step on step activations: nothing runs in int8, the file is tflite-float's",))
    stored = base.binary_stored_bytes - 3 * sum(converted.values())  # those weights: int8, not float32
    return Conversion(data, tuple(rows), base.binary_floor_bytes, stored, notes)


class _File:
    """The flatbuffer's subgraph 0 with producer/consumer maps and helpers to add tensors, buffers and ops."""

    def __init__(self, data: bytes) -> None:
        self.sch = tfl.schema()
        self.model = tfl.read_model(data)
        self.graph = self.model.subgraphs[0]
        self.names = tfl.op_names(self.model)
        self.producer = {int(o): k for k, op in enumerate(self.graph.operators) for o in op.outputs}
        self.consumers: dict[int, list[int]] = {}
        for k, op in enumerate(self.graph.operators):
            for i in op.inputs:
                self.consumers.setdefault(int(i), []).append(k)

    def constant(self, index: int) -> np.ndarray | None:
        tensor = self.graph.tensors[index]
        data = self.model.buffers[tensor.buffer].data
        if data is None or not len(data):
            return None
        dtype = {self.sch.TensorType.FLOAT32: np.float32, self.sch.TensorType.INT32: np.int32}.get(tensor.type)
        if dtype is None:
            return None
        return np.frombuffer(bytes(np.asarray(data, np.uint8)), dtype=dtype).reshape(tensor.shape if len(tensor.shape) else ())

    def step_valued(self, index: int) -> bool:
        """Whether tensor ``index`` holds ±1 or {0, 1} activations."""
        k = self.producer.get(index)
        if k is None:
            return False
        op, name = self.graph.operators[k], self.names[k]
        if name == "SELECT_V2":
            values = [self.constant(int(i)) for i in op.inputs[1:3]]
            return all(v is not None and v.size == 1 for v in values) and \
                {float(v.reshape(())) for v in values} in LEVEL_PAIRS  # type: ignore[union-attr]
        if name == "CAST":
            return self.graph.tensors[int(op.inputs[0])].type == self.sch.TensorType.BOOL
        if name == "PADV2":
            value = self.constant(int(op.inputs[2]))
            return value is not None and float(value.reshape(())) in (-1.0, 0.0, 1.0) and self.step_valued(int(op.inputs[0]))
        if name == "CONCATENATION":
            return all(self.step_valued(int(i)) for i in op.inputs)
        return name in PASSTHROUGH and self.step_valued(int(op.inputs[0]))

    def add_buffer(self, array: np.ndarray | None) -> int:
        buffer = self.sch.BufferT()
        buffer.data = None if array is None else np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8)
        self.model.buffers.append(buffer)
        return len(self.model.buffers) - 1

    def add_tensor(self, name: str, shape, kind: int, channels: int | None, array: np.ndarray | None = None) -> int:
        tensor = self.sch.TensorT()
        tensor.name, tensor.shape, tensor.type = name, np.array(shape, np.int32), kind
        tensor.buffer = self.add_buffer(array) if array is not None else 0
        if kind != self.sch.TensorType.FLOAT32:
            q = self.sch.QuantizationParametersT()
            count = channels or 1
            q.scale, q.zeroPoint = np.ones(count, np.float32), np.zeros(count, np.int64)
            q.quantizedDimension = 0
            tensor.quantization = q
        self.graph.tensors.append(tensor)
        return len(self.graph.tensors) - 1

    def opcode(self, name: str, version: int | None = None) -> int:
        number = getattr(self.sch.BuiltinOperator, name)
        version = INT8_VERSIONS[name] if version is None else version
        for k, code in enumerate(self.model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == number and code.version == version:
                return k
        code = self.sch.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = number, min(number, 127), version
        self.model.operatorCodes.append(code)
        return len(self.model.operatorCodes) - 1


def _operator(f: _File, name: str, source: int, target: int):
    op = f.sch.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = f.opcode(name), np.array([source], np.int32), np.array([target], np.int32)
    return op


def _threshold_conv(f: _File, k: int) -> tuple[int, np.ndarray, np.ndarray, int] | None:
    """(input, ±1 filter, integer −t, comparison op) when op ``k`` is a binary conv on step activations whose only
    reader compares it with per-channel constants, as the TFLite converter leaves a threshold layer."""
    op = f.graph.operators[k]
    if f.names[k] not in LAYERS or len(op.inputs) < 2:
        return None
    if op.builtinOptions is None or op.builtinOptions.fusedActivationFunction != f.sch.ActivationFunctionType.NONE:
        return None  # a fused ReLU (or clamp) would change what the comparison reads
    weight = f.constant(int(op.inputs[1]))
    if weight is None or weight.dtype != np.float32 or not np.all(np.abs(weight) == 1.0):
        return None
    channels = weight.shape[0]
    bias = f.constant(int(op.inputs[2])) if len(op.inputs) > 2 and op.inputs[2] >= 0 else np.zeros(channels, np.float32)
    users = f.consumers.get(int(op.outputs[0]), [])
    if bias is None or len(users) != 1 or f.names[users[0]] not in ("GREATER_EQUAL", "GREATER") \
            or int(op.outputs[0]) in f.graph.outputs:
        return None
    compare = f.graph.operators[users[0]]
    against = f.constant(int(compare.inputs[1]))
    if int(compare.inputs[0]) != int(op.outputs[0]) or against is None or against.dtype != np.float32 \
            or against.size not in (1, channels) or not f.step_valued(int(op.inputs[0])):
        return None
    fires = _first_firing(weight[0].size, bias, np.broadcast_to(against.reshape(-1), (channels,)),
                          f.names[users[0]] == "GREATER")
    return None if fires is None else (int(op.inputs[0]), weight, (-fires).astype(np.int32), users[0])


def _first_firing(fan_in: int, bias: np.ndarray, against: np.ndarray, strict: bool) -> np.ndarray | None:
    """Per channel, the smallest integer sum v with fl(v + bias) ≥ against (> when ``strict``), evaluated in
    float32 on every v in [−K, K] as the float file computes it; K + 1 where none fires. None if not monotone."""
    v = np.arange(-fan_in, fan_in + 1, dtype=np.float32)[:, None]
    y = v + bias[None, :].astype(np.float32)
    fired = (y > against) if strict else (y >= against)
    if not np.all(fired[1:] >= fired[:-1]):
        return None
    first = np.where(fired.any(axis=0), np.argmax(fired, axis=0) - fan_in, fan_in + 1)
    return first.astype(np.int64)


def quantize_threshold_convs(data: bytes) -> tuple[bytes, dict[str, int]]:
    """The file with every threshold binary conv in int8 (module docstring); and each converted conv's output
    tensor name with its number of weights."""
    f = _File(data)
    kinds = f.sch.TensorType
    done: dict[str, int] = {}
    replaced: set[int] = set()
    inserts: list[tuple[int, object]] = []
    for k in range(len(f.graph.operators)):
        found = _threshold_conv(f, k)
        if found is None:
            continue
        source, weight, minus_t, compare_k = found
        op, compare = f.graph.operators[k], f.graph.operators[compare_k]
        x, out = f.graph.tensors[source], f.graph.tensors[int(op.outputs[0])]
        quantized = f.add_tensor(tfl.text(x.name) + "_int8", x.shape, kinds.INT8, None)
        name = f.names[k]
        channels = weight.shape[0] if name == "CONV_2D" else None  # per-channel filters; FC weights per tensor
        replaced.update(int(i) for i in op.inputs[1:3] if i >= 0)
        op.inputs = np.array([quantized,
                              f.add_tensor(tfl.text(f.graph.tensors[int(op.inputs[1])].name) + "_int8", weight.shape,
                                           kinds.INT8, channels, weight.astype(np.int8)),
                              f.add_tensor(tfl.text(out.name) + "_bias_int32", minus_t.shape,
                                           kinds.INT32, channels, minus_t)], np.int32)
        saturated = f.add_tensor(tfl.text(out.name) + "_int8", out.shape, kinds.INT8, None)
        dequantize = _operator(f, "DEQUANTIZE", saturated, int(op.outputs[0]))
        op.outputs = np.array([saturated], np.int32)
        op.opcodeIndex = f.opcode(name)
        zero = f.add_tensor(f"{tfl.text(out.name)}_zero", [], kinds.FLOAT32, None, np.zeros((), np.float32))
        compare.inputs = np.array([int(compare.inputs[0]), zero], np.int32)  # out = v − t: fires iff out ≥ 0
        compare.opcodeIndex = f.opcode("GREATER_EQUAL", 1)
        compare.builtinOptionsType, compare.builtinOptions = 0, None
        inserts.append((k, _operator(f, "QUANTIZE", source, quantized), dequantize))
        done[tfl.text(out.name)] = int(weight.size)
    for k, quantize, dequantize in reversed(inserts):
        f.graph.operators[k:k + 1] = [quantize, f.graph.operators[k], dequantize]
    still_read = {int(i) for op in f.graph.operators for i in op.inputs}
    for index in replaced - still_read:  # the float weights no op reads any more: their bytes leave the file
        f.model.buffers[f.graph.tensors[index].buffer].data = None
    return (tfl.write_model(f.model) if done else data), done
