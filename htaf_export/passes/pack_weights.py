"""Store binary (±1, or ±scale per output channel) weights one bit each, unpacked inside the graph.

The unpacking subgraph reads nothing but initializers, so ONNX Runtime folds it once when the
session starts; at run time the layer sees the same float weights as before, bit for bit
(scale · ±1 is exact):

    bits   = BitwiseAnd(BitShift(packed[n, 1], [7..0], RIGHT), 1)     n = ⌈numel / 8⌉
    weight = Reshape(Cast(Slice(Reshape(bits, [-1]), 0, numel)) · 2 − 1, shape) [· scale]

A weight that is ±scale except for exact zeros (an inline sign(w) with w = 0) has three values; it stays
float and the pass says so (a refusal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .base import PassReport, report
from .util import INTEGER_WEIGHT_INPUTS, WEIGHT_INPUTS, const_array, layer_of_weight, new_initializer, sign_factor, zeros_among_signs

MIN_PACKED = 64  # tiny tensors are not worth a subgraph


@dataclass(frozen=True)
class PackedWeight:
    layer: str
    weight: str
    numel: int
    packed_bytes: int
    overhead_bytes: int  # the per-layer shape and slice constants

    @property
    def floor_bytes(self) -> float:
        return self.numel / 8


def channel_axis(node: ir.Node, rank: int) -> int:
    """The output-channel axis of a layer's weight: OIHW convs 0, ConvTranspose 1, Gemm by transB, MatMul last."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        attr = node.attributes.get("transB")
        return 0 if attr is not None and attr.as_int() else 1
    return rank - 1


def _unpack_nodes(graph: ir.Graph, name: str, array: np.ndarray, scale: np.ndarray | None, axis: int,
                  shared: dict[str, ir.Value], levels: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> tuple[list[ir.Node], ir.Value, int, int]:
    """``levels`` (high, low) for integer weights: bit 1 is high; else float ±1 (times ``scale``)."""
    bits = (array.reshape(-1) == levels[0] if levels is not None else array.reshape(-1) > 0).astype(np.uint8)
    packed = np.packbits(bits, bitorder="big").reshape(-1, 1)
    packed_v = new_initializer(graph, f"{name}.packed", packed)
    shape_v = new_initializer(graph, f"{name}.shape", np.array(array.shape, dtype=np.int64))
    overhead = shape_v.const_value.nbytes  # type: ignore[union-attr]
    shifted = ir.node("BitShift", [packed_v, shared["shifts"]], {"direction": "RIGHT"}, name=f"{name}/shift")
    masked = ir.node("BitwiseAnd", [shifted.outputs[0], shared["one_u8"]], name=f"{name}/mask")
    flat = ir.node("Reshape", [masked.outputs[0], shared["flat_shape"]], name=f"{name}/flatten")
    nodes = [shifted, masked, flat]
    last = flat.outputs[0]
    if packed.size * 8 != array.size:
        end_v = new_initializer(graph, f"{name}.numel", np.array([array.size], dtype=np.int64))
        overhead += end_v.const_value.nbytes  # type: ignore[union-attr]
        cut = ir.node("Slice", [last, shared["zero_i64"], end_v], name=f"{name}/trim")
        nodes.append(cut)
        last = cut.outputs[0]
    if levels is not None:
        as_bool = ir.node("Cast", [last], {"to": ir.DataType.BOOL}, name=f"{name}/cast")
        high, low = (new_initializer(graph, f"htaf.unpack.{array.dtype}_{int(v)}", np.array(v, array.dtype)) for v in levels)
        chosen = ir.node("Where", [as_bool.outputs[0], high, low], name=f"{name}/levels")
        shaped = ir.node("Reshape", [chosen.outputs[0], shape_v], name=f"{name}/reshape")
        nodes += [as_bool, chosen, shaped]
        shaped.outputs[0].name = f"{name}.unpacked"
        return nodes, shaped.outputs[0], int(packed.size), overhead
    as_float = ir.node("Cast", [last], {"to": ir.DataType.FLOAT}, name=f"{name}/cast")
    doubled = ir.node("Mul", [as_float.outputs[0], shared["two"]], name=f"{name}/double")
    signs = ir.node("Sub", [doubled.outputs[0], shared["one_f"]], name=f"{name}/signs")
    shaped = ir.node("Reshape", [signs.outputs[0], shape_v], name=f"{name}/reshape")
    nodes += [as_float, doubled, signs, shaped]
    if scale is not None:
        broadcast = [1] * array.ndim
        broadcast[axis] = -1
        scale_v = new_initializer(graph, f"{name}.scale", scale.reshape(broadcast))
        overhead += scale_v.const_value.nbytes  # type: ignore[union-attr]
        scaled = ir.node("Mul", [shaped.outputs[0], scale_v], name=f"{name}/scale")
        nodes.append(scaled)
        shaped = scaled
    shaped.outputs[0].name = f"{name}.unpacked"
    return nodes, shaped.outputs[0], int(packed.size), overhead


class PackBinaryWeights(ir.passes.InPlacePass):
    """Replace each ±1 weight initializer of a Conv/Gemm/MatMul by its packed bits and an unpacker;
    records one ``PackedWeight`` per packed tensor."""

    def call(self, model: ir.Model) -> PassReport:
        packed, refusals = _pack(model.graph)
        return report(model, packed, refusals=refusals)


def _shared_constants(graph: ir.Graph) -> dict[str, ir.Value]:
    return {
        "shifts": new_initializer(graph, "htaf.unpack.shifts", np.arange(7, -1, -1, dtype=np.uint8).reshape(1, 8)),
        "one_u8": new_initializer(graph, "htaf.unpack.one_u8", np.array(1, dtype=np.uint8)),
        "flat_shape": new_initializer(graph, "htaf.unpack.flat", np.array([-1], dtype=np.int64)),
        "zero_i64": new_initializer(graph, "htaf.unpack.zero", np.array([0], dtype=np.int64)),
        "two": new_initializer(graph, "htaf.unpack.two", np.array(2.0, dtype=np.float32)),
        "one_f": new_initializer(graph, "htaf.unpack.one", np.array(1.0, dtype=np.float32)),
    }


class PackIntegerWeights(ir.passes.InPlacePass):
    """The same for the two-level integer weights of QLinearConv / MatMulInteger (int8 ±1): unpacked to the
    same integers at session start."""

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        shared: dict[str, ir.Value] = {}
        packed: list[PackedWeight] = []
        for node in list(graph):
            index = INTEGER_WEIGHT_INPUTS.get(node.op_type) if node.domain == "" else None
            weight = node.inputs[index] if index is not None and len(node.inputs) > index else None
            array = const_array(weight)
            levels = np.unique(array) if array is not None and array.dtype in (np.int8, np.uint8) else ()
            if weight is None or array is None or len(levels) != 2 or array.size < MIN_PACKED:
                continue
            shared = shared or _shared_constants(graph)
            name = str(weight.name)
            nodes, unpacked, nbytes, overhead = _unpack_nodes(graph, name, array, None, 0, shared,
                                                              (levels[1], levels[0]))
            _swap_in(graph, node, weight, nodes, unpacked)
            packed.append(PackedWeight(layer_of_weight(name, node), name, int(array.size), nbytes, overhead))
        return report(model, packed)


def _swap_in(graph: ir.Graph, node: ir.Node, weight: ir.Value, nodes: list[ir.Node], unpacked: ir.Value) -> None:
    """The unpacking ``nodes`` before ``node``, every reader of ``weight`` reading ``unpacked``, ``weight`` gone."""
    graph.insert_before(node, nodes)
    for use in list(weight.uses()):
        use.node.replace_input_with(use.idx, unpacked)
    if not weight.uses() and weight.name in graph.initializers:
        graph.initializers.pop(weight.name)


def _pack(graph: ir.Graph) -> tuple[list[PackedWeight], list[tuple[str, str]]]:
    shared: dict[str, ir.Value] = {}
    packed: list[PackedWeight] = []
    refusals: list[tuple[str, str]] = []
    for node in list(graph):
        index = WEIGHT_INPUTS.get(node.op_type) if node.domain == "" else None
        if index is None or len(node.inputs) <= index:
            continue
        weight = node.inputs[index]
        array = const_array(weight)
        if array is None or weight is None or array.size < MIN_PACKED:
            continue
        axis = channel_axis(node, array.ndim)
        factor = sign_factor(array, axis)
        if factor is None:
            zeros = zeros_among_signs(array, axis)
            if zeros:
                refusals.append((str(weight.name), f"{zeros:,} weights are exactly 0 (sign(0) = 0, a third value): "
                                                   f"stored as float; binarize with where(w >= 0, 1, -1) to pack"))
            continue
        if not shared:
            shared = _shared_constants(graph)
        name = weight.name or f"{node.name}.weight"
        nodes, unpacked, nbytes, overhead = _unpack_nodes(graph, name, factor[0], factor[1], axis, shared)
        _swap_in(graph, node, weight, nodes, unpacked)
        packed.append(PackedWeight(layer_of_weight(name, node), name, int(array.size), nbytes, overhead))
    return packed, refusals
