"""Bytes of an artifact by layer and category, read from the file itself (for reports and benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import BadInput

CATEGORY_BINARY = "binary weights (1 bit each)"
CATEGORY_UNPACK = "unpacking constants"
CATEGORY_THRESHOLD = "thresholds"
CATEGORY_FLOAT = "float weights"
CATEGORY_OTHER = "other constants"
CATEGORY_GRAPH = "graph, functions and metadata"
CATEGORIES = (CATEGORY_BINARY, CATEGORY_UNPACK, CATEGORY_THRESHOLD, CATEGORY_FLOAT, CATEGORY_OTHER, CATEGORY_GRAPH)
_SUFFIXES = (".weight.packed", ".weight.shape", ".weight.numel", ".weight.unpacked", ".weight", ".bias",
             ".threshold", ".direction", ".running_mean", ".running_var", ".scale", ".packed", ".shape", ".numel")


def _strip(name: str) -> str | None:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _onnx_breakdown(path: Path) -> list[dict[str, Any]]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def layer_of(name: str) -> str:
        stripped = _strip(name)
        if stripped:
            return stripped
        if name.startswith("htaf.unpack."):
            return "(shared unpacking constants)"
        for node in consumers.get(name, []):  # an unnamed bias: the layer whose weight sits beside it
            for other in node.input:
                if other != name and _strip(other):
                    return _strip(other) or other
        return "(unnamed constants)"

    rows: dict[tuple[str, str], int] = {}
    for init in proto.graph.initializer:
        nbytes = len(init.raw_data) if init.HasField("raw_data") else numpy_helper.to_array(init).nbytes
        name = init.name
        if name.endswith(".packed") and init.data_type == onnx.TensorProto.UINT8:
            category = CATEGORY_BINARY
        elif name.startswith("htaf.unpack.") or name.endswith((".shape", ".numel")):
            category = CATEGORY_UNPACK
        elif name.endswith((".threshold", ".direction")):
            category = CATEGORY_THRESHOLD
        elif init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            category = CATEGORY_FLOAT
        else:
            category = CATEGORY_OTHER
        key = (layer_of(name), category)
        rows[key] = rows.get(key, 0) + nbytes
    return [{"layer": layer, "category": category, "bytes": b} for (layer, category), b in rows.items()]


def _tflite_breakdown(path: Path) -> list[dict[str, Any]]:
    from .tflite_file import constant_bytes, op_names, read_model

    model = read_model(path.read_bytes())
    graph = model.subgraphs[0]
    ops = op_names(model)
    binary_filters = {int(op.inputs[1]) for op, name in zip(graph.operators, ops)
                      if name == "LceBconv2d" and len(op.inputs) > 1}
    consumer: dict[int, str] = {}
    for k, (op, name) in enumerate(zip(graph.operators, ops)):
        for i in op.inputs:
            consumer.setdefault(int(i), f"op {k} {name}")
    rows: dict[tuple[str, str], int] = {}
    for index, tensor in enumerate(graph.tensors):
        nbytes = constant_bytes(model, index)
        if not nbytes:
            continue
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
        # Layers named after their weights where the converter kept the names; else the op that reads them.
        layer = _strip(name.split(";")[0]) or consumer.get(index) or name
        if index in binary_filters:
            category = CATEGORY_BINARY
        elif "threshold" in name:
            category = CATEGORY_THRESHOLD
        elif tensor.type in (0, 1):  # FLOAT32, FLOAT16
            category = CATEGORY_FLOAT
        else:
            category = CATEGORY_OTHER
        rows[(layer, category)] = rows.get((layer, category), 0) + nbytes
    return [{"layer": layer, "category": category, "bytes": b} for (layer, category), b in rows.items()]


def size_breakdown(path: str | Path) -> dict[str, Any]:
    """Bytes of the artifact by layer and category, read from the file itself.

    ONNX: initializers (packed 1-bit weights, unpacking constants, thresholds, float weights); TFLite:
    constant buffers (LCE bit-packed filters, float weights). The rest of the file (graph, functions,
    metadata) is one more row. A file that cannot be read this way is one row.
    """
    path = Path(path)
    total = path.stat().st_size if path.is_file() else 0
    rows: list[dict[str, Any]] = []
    note = None
    try:
        if path.suffix == ".onnx":
            rows = _onnx_breakdown(path)
        elif path.suffix == ".tflite":
            rows = _tflite_breakdown(path)
    except (OSError, ValueError, BadInput) as e:  # a breakdown is a nicety; the report must still be written
        note = f"size breakdown unavailable: {type(e).__name__}"
        rows = []
    counted = sum(r["bytes"] for r in rows)
    rows.append({"layer": "(graph, functions, metadata)", "category": CATEGORY_GRAPH, "bytes": max(total - counted, 0)})
    by_category = {c: sum(r["bytes"] for r in rows if r["category"] == c) for c in CATEGORIES}
    out: dict[str, Any] = {"total_bytes": total, "by_category": {k: v for k, v in by_category.items() if v},
                           "rows": sorted(rows, key=lambda r: (-r["bytes"], r["layer"]))}
    if note:
        out["note"] = note
    return out
