"""A zero bias of the wrong shape, written by torch's ONNX exporter for ``F.conv3d(x, w, None, ...)`` when the
weight is computed (a binarized ``w``): its translation makes the missing bias ``Expand(0, [C_out, 2])``, a
[C_out, 2] tensor, and ONNX Runtime refuses the Conv ("bias must be a 1D tensor"). A zero bias adds nothing,
so it is dropped."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import PassReport, report
from .util import const_array


class DropMalformedZeroBiases(ir.passes.InPlacePass):
    """Remove the bias input of each Conv / ConvTranspose whose bias is a constant of zeros not shaped [C_out];
    records the nodes."""

    def call(self, model: ir.Model) -> PassReport:
        dropped = []
        for node in model.graph:
            if node.domain != "" or node.op_type not in ("Conv", "ConvTranspose") or len(node.inputs) < 3:
                continue
            bias = const_array(node.inputs[2])
            if bias is not None and bias.ndim != 1 and not np.any(bias):
                node.resize_inputs(2)
                dropped.append(node.name)
        return report(model, dropped)
