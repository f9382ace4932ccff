"""ONNX target: the IR with batch norms folded into step thresholds, 1-bit weights, and step functions.

Steps stay ``htaf.Heaviside`` / ``htaf.Sign`` nodes whose ONNX function bodies (comparison and
cast) let stock ONNX Runtime run the file. ``portable`` inlines those functions, leaving standard
ops only, for runtimes without function support.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import onnx
import onnx.inliner
import onnx_ir as ir

from htaf_export import metadata as md
from htaf_export.capture import Capture, cleanup
from htaf_export.contracts import PACKED_WEIGHTS, Conversion, LayerRow
from htaf_export.ops import HTAF_DOMAIN, attach_step_functions
from htaf_export.passes import FoldBatchNormIntoSteps, PackBinaryWeights, PackedWeight
from htaf_export.passes.util import layer_of
from htaf_export.targets import ExportOptions

from .integer_steps import IntegerThresholdSteps


@dataclass(frozen=True)
class OnnxBuild:
    """The built model and the weights it stores as packed bits."""

    proto: onnx.ModelProto
    packed: tuple[PackedWeight, ...] = ()
    unpacked: tuple[tuple[str, str], ...] = ()  # (weight, why it stays float) for ±1-like weights not packed

    @property
    def binary_floor_bytes(self) -> float:
        return sum(p.floor_bytes for p in self.packed)

    @property
    def binary_stored_bytes(self) -> int:
        return sum(p.packed_bytes + p.overhead_bytes for p in self.packed)

    def serialized(self) -> bytes:
        return self.proto.SerializeToString(deterministic=True)


def _tie_of(capture: Capture) -> str:
    """The file's tie rule: the one every step declares, or "mixed" (then each step's own is in its entry)."""
    ties = sorted({s.tie for s in capture.steps})
    return ties[0] if len(ties) == 1 else ("mixed" if ties else "ge")


def build(capture: Capture, provenance: Mapping[str, str], *, portable: bool = False, pack_weights: bool = True,
          fold_batchnorm: bool = True) -> OnnxBuild:
    """IR → ONNX model with ``provenance`` in its metadata_props. ``pack_weights``/``fold_batchnorm`` off
    give the plain float file (benchmarks compare against it)."""
    model = capture.ir_copy()  # converters never modify the shared IR
    if fold_batchnorm:
        IntegerThresholdSteps()(model)
        FoldBatchNormIntoSteps()(model)
    packing = PackBinaryWeights()(model) if pack_weights else None
    packed: tuple[PackedWeight, ...] = packing.records if packing else ()
    cleanup(model, fold=False)
    proto = ir.to_proto(model)
    attach_step_functions(proto)
    if portable:
        proto = onnx.inliner.inline_local_functions(proto)
        del proto.functions[:]
        kept = [o for o in proto.opset_import if o.domain != HTAF_DOMAIN]
        del proto.opset_import[:]
        proto.opset_import.extend(kept)
    stamp(proto, capture, provenance, "portable" if portable else "htaf-functions", packed)
    onnx.checker.check_model(proto, full_check=True)
    return OnnxBuild(proto, packed, packing.refusals if packing else ())


def stamp(proto: onnx.ModelProto, capture: Capture, provenance: Mapping[str, str], mode: str,
          packed: Sequence[PackedWeight] | None = None, extra: Mapping[str, str] | None = None) -> None:
    """Producer, IR version and the htaf metadata (provenance, tie, mode, steps, packed weights, ``extra``) of an
    ONNX file."""
    proto.ir_version = 10
    proto.producer_name = "htaf-export"
    # A converter's own clean-up (common-subexpression elimination after batch norms or thresholds are
    # folded) can merge two step calls that were distinct at capture: list only the steps the file computes.
    produced = {o for n in proto.graph.node for o in n.output}
    steps = [s for s in capture.steps if s.tensor in produced]
    meta = {**md.encode(provenance), md.TIE: _tie_of(capture), md.ONNX_MODE: mode,
            md.STEPS: json.dumps([s.to_dict() for s in steps], sort_keys=True)}
    if packed is not None:
        meta[md.BINARY_WEIGHTS] = json.dumps([asdict(p) for p in packed], sort_keys=True)
    meta.update(extra or {})
    del proto.metadata_props[:]
    for key in sorted(meta):
        proto.metadata_props.add(key=key, value=meta[key])


def packed_rows(packed: Sequence[PackedWeight]) -> list[LayerRow]:
    return [LayerRow(p.layer, PACKED_WEIGHTS, f"{p.numel:,} weights in {p.packed_bytes:,} B") for p in packed]


def convert(capture: Capture, provenance: Mapping[str, str], options: ExportOptions) -> Conversion:
    """The target's contract: IR + provenance + options → the .onnx bytes and the export summary."""
    built = build(capture, provenance, portable=options.portable)
    rows = packed_rows(built.packed) + [LayerRow(layer_of(w), "float weights", why) for w, why in built.unpacked]
    rows += [LayerRow(s.tensor, f"{s.op} (standard ops)" if options.portable else f"htaf.{s.op}", f"tie {s.tie}")
             for s in capture.steps]
    return Conversion(built.serialized(), tuple(rows), built.binary_floor_bytes, built.binary_stored_bytes)


__all__ = ["convert", "build", "OnnxBuild", "stamp", "packed_rows"]
