"""Store binary (±1) weights one bit each, unpacked inside the graph from initializers only.

The unpacking subgraph reads nothing but initializers, so ONNX Runtime folds it once when the
session starts; at run time the layer sees the same float ±1 weights as before.

    bits   = BitwiseAnd(BitShift(packed[n, 1], [7..0], RIGHT), 1)     n = ⌈numel / 8⌉
    weight = Reshape(Cast(Slice(Reshape(bits, [-1]), 0, numel)) · 2 − 1, shape)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .base import PassReport, report
from .util import const_array, new_initializer

# (op type, index of the weight input) of the layers whose weights may be binary.
WEIGHT_INPUTS = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1}
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


def is_binary(array: np.ndarray) -> bool:
    return array.dtype == np.float32 and array.size >= MIN_PACKED and bool(np.all(np.abs(array) == 1.0))


def _unpack_nodes(graph: ir.Graph, name: str, array: np.ndarray, shared: dict[str, ir.Value]) -> tuple[list[ir.Node], ir.Value, int, int]:
    bits = (array.reshape(-1) > 0).astype(np.uint8)
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
    as_float = ir.node("Cast", [last], {"to": ir.DataType.FLOAT}, name=f"{name}/cast")
    doubled = ir.node("Mul", [as_float.outputs[0], shared["two"]], name=f"{name}/double")
    signs = ir.node("Sub", [doubled.outputs[0], shared["one_f"]], name=f"{name}/signs")
    shaped = ir.node("Reshape", [signs.outputs[0], shape_v], name=f"{name}/reshape")
    shaped.outputs[0].name = f"{name}.unpacked"
    nodes += [as_float, doubled, signs, shaped]
    return nodes, shaped.outputs[0], int(packed.size), overhead


class PackBinaryWeights(ir.passes.InPlacePass):
    """Replace each ±1 weight initializer of a Conv/Gemm/MatMul by its packed bits and an unpacker;
    records one ``PackedWeight`` per packed tensor."""

    def call(self, model: ir.Model) -> PassReport:
        return report(model, _pack(model.graph))


def _shared_constants(graph: ir.Graph) -> dict[str, ir.Value]:
    return {
        "shifts": new_initializer(graph, "htaf.unpack.shifts", np.arange(7, -1, -1, dtype=np.uint8).reshape(1, 8)),
        "one_u8": new_initializer(graph, "htaf.unpack.one_u8", np.array(1, dtype=np.uint8)),
        "flat_shape": new_initializer(graph, "htaf.unpack.flat", np.array([-1], dtype=np.int64)),
        "zero_i64": new_initializer(graph, "htaf.unpack.zero", np.array([0], dtype=np.int64)),
        "two": new_initializer(graph, "htaf.unpack.two", np.array(2.0, dtype=np.float32)),
        "one_f": new_initializer(graph, "htaf.unpack.one", np.array(1.0, dtype=np.float32)),
    }


def _pack(graph: ir.Graph) -> list[PackedWeight]:
    shared: dict[str, ir.Value] = {}
    packed: list[PackedWeight] = []
    for node in list(graph):
        index = WEIGHT_INPUTS.get(node.op_type) if node.domain == "" else None
        if index is None or len(node.inputs) <= index:
            continue
        weight = node.inputs[index]
        array = const_array(weight)
        if array is None or not is_binary(array) or weight is None:
            continue
        if not shared:
            shared = _shared_constants(graph)
        name = weight.name or f"{node.name}.weight"
        nodes, unpacked, nbytes, overhead = _unpack_nodes(graph, name, array, shared)
        graph.insert_before(node, nodes)
        for use in list(weight.uses()):
            use.node.replace_input_with(use.idx, unpacked)
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)
        packed.append(PackedWeight(name.removesuffix(".weight"), name, int(array.size), nbytes, overhead))
    return packed
