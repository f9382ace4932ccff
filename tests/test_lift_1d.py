"""1-D maps lifted to height-1 2-D ones for the TFLite targets (``converters/lift_1d``): the graph computes the same
in ONNX Runtime before and after, the windows are 2-D, the readers without a 2-D form get the 1-D map back, and the
graph outputs keep their names and shapes."""

from __future__ import annotations

import numpy as np
import onnx.parser
import onnx.shape_inference
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper

from htaf_export.converters.lift_1d import LIFTED, lift_one_dimensional

GRAPH = """<ir_version: 8, opset_import: ["" : 18]>
sequence (float[N, 4, 10] x) => (float[N, 5] logits, float[N, 10, 6] frames, float[N, 2, 10] head) {
    conv = Conv <pads = [1, 1]> (x, w1, b1)
    fired = Relu (conv)
    pooled = MaxPool <kernel_shape = [2], strides = [2]> (fired)
    flat = Flatten <axis = 1> (pooled)
    logits = Gemm <transB = 1> (flat, wf)
    frames = Transpose <perm = [0, 2, 1]> (fired)
    head = Conv (fired, w2)
}
"""


def _model(auto_pad: str = "") -> ir.Model:
    text = GRAPH.replace("<pads = [1, 1]>", f'<auto_pad = "{auto_pad}">') if auto_pad else GRAPH
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    weights = {"w1": (6, 4, 3), "b1": (6,), "wf": (5, 30), "w2": (2, 6, 1)}
    for name, shape in weights.items():  # integers: every sum is exact, whatever order a kernel adds in
        proto.graph.initializer.append(numpy_helper.from_array(rng.integers(-2, 3, shape).astype(np.float32), name))
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))  # a capture's values have types


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_lifted_graph_computes_the_same_with_2d_windows():
    x = np.random.default_rng(1).integers(-3, 4, (3, 4, 10)).astype(np.float32)
    model = _model()
    before = _run(model, x)
    assert lift_one_dimensional(model) == 3
    windows = [n for n in model.graph if n.op_type in ("Conv", "MaxPool")]
    assert all(n.inputs[1].const_value.shape.rank() == 4 for n in windows if n.op_type == "Conv"), windows
    assert [list(n.attributes["kernel_shape"].value) for n in windows if n.op_type == "MaxPool"] == [[1, 2]]
    transpose = next(n for n in model.graph if n.op_type == "Transpose")
    assert transpose.inputs[0].producer().op_type == "Squeeze", "a reader without a 2-D form reads [N, C, L]"
    assert [v.name for v in model.graph.outputs] == ["logits", "frames", "head"]
    assert {"conv", "fired", "pooled"} <= model.graph.meta[LIFTED]
    after = _run(model, x)
    for b, a in zip(before, after):
        assert b.shape == a.shape and np.array_equal(b, a)


def test_auto_pad_convolution_stays_1d():
    x = np.random.default_rng(2).integers(-3, 4, (2, 4, 10)).astype(np.float32)
    model = _model(auto_pad="SAME_UPPER")
    before = _run(model, x)
    assert lift_one_dimensional(model) == 2  # the pool and the head after it lift; the converter refuses the conv
    conv = next(n for n in model.graph if n.outputs[0].name == "conv")
    assert conv.inputs[1].const_value.shape.rank() == 3
    assert all(np.array_equal(b, a) for b, a in zip(before, _run(model, x)))
