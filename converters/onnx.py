"""ONNX target: the IR with batch norms folded into step thresholds, 1-bit weights, and step functions.

Steps stay ``htaf.Heaviside`` / ``htaf.Sign`` nodes whose ONNX function bodies (comparison and
cast) let stock ONNX Runtime run the file. ``portable`` inlines those functions, leaving standard
ops only, for runtimes without function support.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx.inliner
import onnx_ir as ir
from onnx import helper

from htaf_export.capture import OPSET, Capture, cleanup
from htaf_export.ops import HTAF_DOMAIN, HTAF_OPSET_VERSION
from htaf_export.errors import UnsupportedLayer
from htaf_export.passes import PackedWeight, fold_batchnorm_into_steps, pack_binary_weights



@dataclass
class OnnxOptions:
    portable: bool = False
    pack_weights: bool = True
    fold_batchnorm: bool = True


@dataclass
class OnnxArtifact:
    proto: onnx.ModelProto
    packed: list[PackedWeight] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def binary_floor_bytes(self) -> float:
        return sum(p.floor_bytes for p in self.packed)

    @property
    def binary_stored_bytes(self) -> int:
        return sum(p.packed_bytes + p.overhead_bytes for p in self.packed)

    def serialized(self) -> bytes:
        return self.proto.SerializeToString(deterministic=True)


def step_function(op: str, tie: str) -> onnx.FunctionProto:
    """Body of htaf.Heaviside (→ {0,1}) or htaf.Sign (→ {−1,+1}) for one tie rule."""
    compare = "GreaterOrEqual" if tie == "ge" else "Greater"
    nodes = [helper.make_node(compare, ["X", "T"], ["fired"])]
    if op == "Heaviside":
        nodes.append(helper.make_node("CastLike", ["fired", "X"], ["Y"]))
    else:
        nodes += [
            helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])),
            helper.make_node("Constant", [], ["minus_one"],
                             value=helper.make_tensor("minus_one", onnx.TensorProto.FLOAT, [], [-1.0])),
            helper.make_node("CastLike", ["one", "X"], ["one_x"]),
            helper.make_node("CastLike", ["minus_one", "X"], ["minus_one_x"]),
            helper.make_node("Where", ["fired", "one_x", "minus_one_x"], ["Y"]),
        ]
    doc = (f"{op}(X, T): {'1' if op == 'Heaviside' else '+1'} where X {'>=' if tie == 'ge' else '>'} T, "
           f"else {'0' if op == 'Heaviside' else '-1'} (tie rule '{tie}').")
    return helper.make_function(HTAF_DOMAIN, op, ["X", "T"], ["Y"], nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["tie"], doc_string=doc)


def _tie_of(capture: Capture) -> str:
    ties = sorted({s.tie for s in capture.steps})
    if len(ties) > 1:
        mixed = ", ".join(f"{s.site} ({s.tie})" for s in capture.steps)
        raise UnsupportedLayer(capture.steps[0].site, f"steps use different tie rules ({mixed}); "
                               f"declare one with --tie")
    return ties[0] if ties else "ge"


def convert(capture: Capture, metadata: dict[str, Any], options: OnnxOptions | None = None) -> OnnxArtifact:
    """IR → ONNX artifact. ``metadata`` is stored in the file's metadata_props (values JSON-encoded)."""
    options = options or OnnxOptions()
    model = ir.from_proto(ir.to_proto(capture.model))  # converters never modify the shared IR
    if options.fold_batchnorm:
        fold_batchnorm_into_steps(model)
    packed: list[PackedWeight] = []
    if options.pack_weights:
        _, packed = pack_binary_weights(model)
    cleanup(model, fold=False)
    proto = ir.to_proto(model)
    tie = _tie_of(capture)
    ops = sorted({n.op_type for n in proto.graph.node if n.domain == HTAF_DOMAIN})
    proto.functions.extend(step_function(op, tie) for op in ops)
    if ops:
        del proto.opset_import[:]
        proto.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(HTAF_DOMAIN, HTAF_OPSET_VERSION)])
    if options.portable:
        proto = onnx.inliner.inline_local_functions(proto)
        del proto.functions[:]
        kept = [o for o in proto.opset_import if o.domain != HTAF_DOMAIN]
        del proto.opset_import[:]
        proto.opset_import.extend(kept)
    proto.ir_version = 10
    proto.producer_name = "htaf-export"
    meta = {**{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()},
            "htaf_export.tie": tie,
            "htaf_export.mode": "portable" if options.portable else "htaf-functions",
            "htaf_export.steps": json.dumps([s.__dict__ for s in capture.steps], sort_keys=True),
            "htaf_export.binary_weights": json.dumps([p.__dict__ for p in packed], sort_keys=True)}
    del proto.metadata_props[:]
    for key in sorted(meta):
        proto.metadata_props.add(key=key, value=meta[key])
    onnx.checker.check_model(proto, full_check=True)
    return OnnxArtifact(proto, packed, meta)
