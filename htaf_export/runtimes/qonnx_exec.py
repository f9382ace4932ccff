"""qonnx's own executor (``qonnx.core.onnx_exec.execute_onnx``) as a validation backend for ``qonnx`` files.

It runs the graph node by node: standard ops in one-node ONNX Runtime sessions, QONNX custom ops
(``BipolarQuant``, ``MultiThreshold``) in qonnx's Python — an implementation of their semantics independent
of this project. Plain ONNX Runtime cannot run those ops, so it is not a backend for these files.
"""

from __future__ import annotations

import time

import numpy as np
import onnx

from ..errors import BadInput
from . import ArtifactInfo

NAME = "qonnx-exec"
ORT_SKIP = ("onnxruntime", "cannot run QONNX custom ops (BipolarQuant, MultiThreshold); qonnx-exec validates this file")


def _qonnx():
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx
        from qonnx.transformation.infer_shapes import InferShapes
    except ImportError:
        raise BadInput("validating a qonnx file needs qonnx: pip install 'htaf-export[qonnx]'") from None
    return ModelWrapper, execute_onnx, InferShapes


class QonnxRunner:
    """Runs a qonnx file on batches; one shape-inferred model per batch size (execute_onnx needs static shapes)."""

    def __init__(self, info: ArtifactInfo) -> None:
        self.info = info
        self.name = NAME
        self.device = "cpu"
        self.inference_seconds = 0.0
        self.proto = onnx.load(str(info.path))
        self._models: dict[int, object] = {}
        self.wanted = list(info.output_names) + [s.tensor for s in info.steps if s.tensor not in info.output_names]

    def _model(self, batch: int):
        if batch not in self._models:
            model_wrapper, _, infer_shapes = _qonnx()
            proto = onnx.ModelProto()
            proto.CopyFrom(self.proto)
            for value in list(proto.graph.input) + list(proto.graph.output):
                dims = value.type.tensor_type.shape.dim
                if dims and not dims[0].HasField("dim_value"):
                    dims[0].dim_value = batch
            del proto.graph.value_info[:]
            self._models[batch] = model_wrapper(proto).transform(infer_shapes())
        return self._models[batch]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _, execute_onnx, _ = _qonnx()
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        batch = int(next(iter(feed.values())).shape[0])
        model = self._model(batch)
        started = time.perf_counter()
        context = execute_onnx(model, feed, return_full_exec_context=True)
        self.inference_seconds += time.perf_counter() - started
        return {name: np.asarray(context[name], dtype=np.float32) for name in self.wanted}
