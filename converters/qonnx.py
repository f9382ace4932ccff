"""``qonnx`` target: the IR as QONNX, the form Brevitas exports and FINN's front end reads.

    IR ─copy─▶ fuse binary layers (tflite_binary: integer thresholds) ─▶ fold the other batch norms into step
       thresholds ─▶ QONNX ops (qonnx_graph) ─▶ datatype annotations (qonnx's ModelWrapper) ─▶ .onnx bytes

Mapping (docs/qonnx.md): ±1 weights → float initializer + ``BipolarQuant`` (as Brevitas writes them); a binary
layer that ends in a step → conv/dense of the ±1 weights (flip folded in) + ``MultiThreshold`` with its integer
thresholds (what FINN streamlining makes of batch norm + sign); other steps → ``BipolarQuant`` (sign at 0) or
``MultiThreshold`` (any other threshold, and every {0, 1} step). QONNX compares with ``>=``: a ``gt`` site's
threshold moves to the next float32 up, which is exact for float32 inputs.
"""

from __future__ import annotations

from typing import Mapping

import onnx
import onnx_ir as ir

from htaf_export.capture import Capture, cleanup
from htaf_export.contracts import Conversion, LayerRow
from htaf_export.errors import BadInput, UnsupportedLayer
from htaf_export.passes.util import distinct_names
from htaf_export.targets import ExportOptions

from .layer_ops import fused_ir
from .onnx import stamp
from .qonnx_graph import QONNX_DOMAIN, QonnxGraph
from .tflite_binary import INTEGER_LEVELS

MODE = "qonnx"


def convert(capture: Capture, provenance: Mapping[str, str], options: ExportOptions) -> Conversion:
    """The target's contract: IR + provenance + options → the .onnx (QONNX) bytes and the export summary."""
    if capture.streaming:
        raise UnsupportedLayer("model", "qonnx exports unrolled models only (FINN has no streaming state)")
    if options.portable:
        raise UnsupportedLayer("model", "--portable is for the onnx target; qonnx files need qonnx's custom ops")
    model, refusals = fused_ir(capture, levels=INTEGER_LEVELS)
    lowering = QonnxGraph(model.graph)
    lowering.lower()
    cleanup(model, fold=False)
    repeated = distinct_names(model.graph)
    datatypes = {**lowering.datatypes, **{new: lowering.datatypes[old] for new, old in repeated.items()
                                          if old in lowering.datatypes}}
    proto = ir.to_proto(model)
    kept = [o for o in proto.opset_import if o.domain not in ("htaf", QONNX_DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend([*kept, onnx.helper.make_opsetid(QONNX_DOMAIN, 1)])
    proto = annotate(proto, datatypes)
    stamp(proto, capture, provenance, MODE)  # IR version 10, as Brevitas 0.13 writes
    onnx.checker.check_model(proto)
    rows = [LayerRow(name, became, note) for name, became, note in lowering.rows]
    rows += [LayerRow(name, "float", reason) for name, reason in refusals]
    return Conversion(proto.SerializeToString(deterministic=True), tuple(rows), notes=lowering.notes)


def qonnx_module():
    try:
        import qonnx  # noqa: F401
    except ImportError:
        raise BadInput("the qonnx target needs qonnx: pip install 'htaf-export[qonnx]'") from None
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper

    return ModelWrapper, DataType


def annotate(proto: onnx.ModelProto, datatypes: Mapping[str, str]) -> onnx.ModelProto:
    """The model with qonnx datatype annotations (``finn_datatype``) on the named tensors."""
    model_wrapper, datatype = qonnx_module()
    wrapped = model_wrapper(proto)
    present = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.initializer}
    for tensor, kind in sorted(datatypes.items()):
        if tensor in present:
            wrapped.set_tensor_datatype(tensor, datatype[kind])
    return wrapped.model
