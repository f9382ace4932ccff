"""``onnx-int8`` target: binary layers as integer ops on stock ONNX Runtime's int8 kernels, exact.

    IR ─copy─▶ fuse binary layers (tflite_binary: integer thresholds, {±1, 0/1} inputs)
       ─▶ fold the other batch norms into step thresholds ─▶ integer layers and bool steps (integer_graph)
       ─▶ channels-last between im2col products (channels_last; such step tensors are listed in the metadata)
       ─▶ 1-bit packed weights (float ±1 and two-level integers) ─▶ .onnx bytes

The first layer on real inputs, the classifier's scale and everything that is not a binary layer stay float,
as in the ``onnx`` target. See ``int8_layers`` for the ops and why those, and docs/integer-targets.md.
"""

from __future__ import annotations

import json
from typing import Mapping

import onnx
import onnx_ir as ir

from htaf_export import metadata as md
from htaf_export.capture import Capture, cleanup
from htaf_export.contracts import Conversion, LayerRow
from htaf_export.errors import UnsupportedLayer
from htaf_export.ops import attach_step_functions
from htaf_export.passes import PackBinaryWeights, PackIntegerWeights
from htaf_export.passes.util import distinct_names
from htaf_export.targets import ExportOptions

from .channels_last import to_channels_last
from .integer_graph import IntegerGraph
from .layer_ops import fused_ir
from .onnx import packed_rows, stamp
from .tflite_binary import INTEGER_LEVELS

MODE = "integer"


def convert(capture: Capture, provenance: Mapping[str, str], options: ExportOptions) -> Conversion:
    """The target's contract: IR + provenance + options → the .onnx bytes and the export summary."""
    if capture.streaming:
        raise UnsupportedLayer("model", "onnx-int8 exports unrolled models only; use --target onnx for streaming")
    if options.portable:
        raise UnsupportedLayer("model", "--portable is for the onnx target; onnx-int8 uses standard ops only")
    model, refusals = fused_ir(capture, levels=INTEGER_LEVELS, two_d=True)
    lowering = IntegerGraph(model.graph)
    lowering.lower()
    twins = to_channels_last(model)
    packed = PackIntegerWeights()(model).records + PackBinaryWeights()(model).records
    cleanup(model, fold=False)
    distinct_names(model.graph)
    channels_last = lowering.name_steps(twins)
    proto = ir.to_proto(model)
    attach_step_functions(proto)
    stamp(proto, capture, provenance, MODE, packed,
          {md.CHANNELS_LAST_STEPS: json.dumps(sorted(channels_last))} if channels_last else None)
    onnx.checker.check_model(proto, full_check=True)
    rows = [LayerRow(lw.layer.name, f"{lw.ops} ({lw.layer.mode})" if lw.form == "integer" else f"float {lw.ops}",
                     lw.reason or "; ".join(lw.layer.notes) or "exact integer sums") for lw in lowering.lowered]
    rows += [LayerRow(name, "float", reason) for name, reason in refusals]
    rows = _with_packing(rows, packed_rows(packed))
    notes = () if lowering.lowered else (
        "no binary layer (±1 weights on step activations) in this model: nothing runs on integer kernels, "
        "so this file is no faster than --target onnx",)
    return Conversion(proto.SerializeToString(deterministic=True), tuple(rows), notes=notes,
                      binary_floor_bytes=sum(p.floor_bytes for p in packed),
                      binary_stored_bytes=sum(p.packed_bytes + p.overhead_bytes for p in packed))


def _with_packing(rows: list[LayerRow], packing: list[LayerRow]) -> list[LayerRow]:
    """One row a layer: how its weights are stored joins the row of its kernel (a layer left without one keeps
    its own row)."""
    stored = {r.layer: r.note for r in packing}
    merged = [LayerRow(r.layer, r.became, f"{r.note}; stored 1-bit: {stored[r.layer]}") if r.layer in stored else r
              for r in rows]
    kernels = {r.layer for r in rows}
    return merged + [r for r in packing if r.layer not in kernels]
