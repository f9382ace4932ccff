"""qonnx target: every family exports to QONNX and is validated by qonnx's own executor; the file is in the
form FINN's front end reads (qonnx's clean-up, shape and datatype inference run on it); ties and sabotage."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import htaf_export
from htaf_export import cli
from htaf_export.nn import HTAF

from conftest import save_pt2

pytest.importorskip("qonnx")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
QONNX = "qonnx.custom_op.general"
# op counts each sample's file must hold
EXPECTED = {"bnn_mlp": {"BipolarQuant": 3, "MultiThreshold": 2}, "bnn_cnn": {"BipolarQuant": 4, "MultiThreshold": 3},
            "dhn_mlp": {"MultiThreshold": 2}, "snn_mlp": {"MultiThreshold": 16}, "icbm_cnn": {"MultiThreshold": 1}}


def _export(source, out: Path, **kwargs) -> htaf_export.ExportResult:
    with contextlib.redirect_stdout(io.StringIO()):
        return htaf_export.export(source, "qonnx", out, device="cpu", **kwargs)


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        if node.domain == QONNX:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("name", list(EXPECTED))
def test_samples_export_to_qonnx_and_pass_on_qonnx_exec(name, tmp_path):
    result = _export(SAMPLES / f"{name}.pt", tmp_path / f"{name}.qonnx.onnx")
    report = result.report
    assert report is not None and report.passed, report.failure_line()
    assert [b.backend for b in report.backends] == ["qonnx-exec"]
    assert any(s["backend"] == "onnxruntime" for s in report.skipped)
    assert _ops(result.artifact) == EXPECTED[name]
    steps = [t for t in report.backends[0].tensors if t.kind == "binary"]
    assert steps and all(t.elements > 0 for t in steps)
    proto = onnx.load(str(result.artifact))
    assert not [n for n in proto.graph.node if n.domain == "htaf"], "no htaf op is left for FINN to trip on"


def test_the_file_is_ready_for_finn(tmp_path):
    """qonnx's clean-up, shape and datatype inference run cleanly, and the datatypes are the annotated ones."""
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model

    artifact = _export(SAMPLES / "bnn_cnn.pt", tmp_path / "m.qonnx.onnx", validate_artifact=False).artifact
    annotated = ModelWrapper(str(artifact))
    sums = [annotated.get_tensor_datatype(n.output[0]) for n in annotated.graph.node if n.op_type == "Conv"]
    assert DataType["INT10"] in sums  # a 3x3x32 binary conv: sums in [−288, 288] (inference widens it to INT32)
    model = cleanup_model(annotated)
    model = model.transform(InferShapes()).transform(InferDataTypes())
    kinds = [(n.op_type, model.get_tensor_datatype(n.output[0])) for n in model.graph.node if n.domain == QONNX]
    assert len(kinds) == 7 and all(kind == DataType["BIPOLAR"] for _, kind in kinds), kinds


class GtSteps(nn.Module):
    """Two sites declaring tie gt at non-zero thresholds: QONNX compares with >=, so the thresholds move."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fire = HTAF(threshold=0.25, levels="01", tie="gt")
        self.fc2 = nn.Linear(5, 4)
        self.sign = HTAF(threshold=-0.5, levels="pm1", tie="gt")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sign(self.fc2(self.fire(self.fc1(x))))


def test_gt_sites_keep_their_rule_at_exact_ties(tmp_path):
    torch.manual_seed(0)
    model = GtSteps().eval()
    with torch.no_grad():  # weights and inputs chosen so that pre-activations land exactly on the thresholds
        model.fc1.weight.copy_(torch.eye(5, 6))
        model.fc1.bias.zero_()
        model.fc2.weight.copy_(torch.eye(4, 5))
        model.fc2.bias.copy_(torch.tensor([-1.5, -0.5, 0.5, -1.5]))
    x = np.zeros((4, 6), np.float32)
    x[:, :5] = 0.25  # fc1 = 0.25 exactly: does not fire under gt
    x[1, 0] = 0.2500001
    data = tmp_path / "ties.npz"
    np.savez(data, x=x)
    path = tmp_path / "gt.pt2"
    save_pt2(model, torch.zeros(2, 6), path)
    result = _export(path, tmp_path / "gt.qonnx.onnx", data=data, tie="gt")
    assert result.report.passed, result.report.failure_line()
    moved = [r for r in result.conversion.rows if "next float32 up" in r.became]
    assert len(moved) == 2


def _sabotaged(artifact: Path, out: Path, op: str, change) -> None:
    proto = onnx.load(str(artifact))
    node = next(n for n in proto.graph.node if n.op_type == op and n.domain == QONNX
                and any(i.name == n.input[0 if op == "BipolarQuant" else 1] for i in proto.graph.initializer))
    name = node.input[0 if op == "BipolarQuant" else 1]
    tensor = next(i for i in proto.graph.initializer if i.name == name)
    array = numpy_helper.to_array(tensor).copy()
    change(array.reshape(-1))
    tensor.CopyFrom(numpy_helper.from_array(array, name))
    onnx.save(proto, str(out))


@pytest.mark.parametrize(("op", "first_failing"), [("MultiThreshold", "layers.act1"), ("BipolarQuant", "layers.act1")])
def test_sabotaged_qonnx_files_fail_and_name_the_step(tmp_path, capsys, op, first_failing):
    good = _export(SAMPLES / "bnn_cnn.pt", tmp_path / "m.qonnx.onnx", validate_artifact=False).artifact
    bad = tmp_path / "bad.qonnx.onnx"

    def change(flat: np.ndarray) -> None:
        if op == "MultiThreshold":
            flat[0] += np.float32(0.75)  # one channel's threshold moved
        else:
            flat[:64] *= -1  # 64 weights of the first layer flip sign

    _sabotaged(good, bad, op, change)
    capsys.readouterr()
    assert cli.main(["validate", str(SAMPLES / "bnn_cnn.pt"), str(bad)]) == 1
    assert f"first failing tensor {first_failing}" in capsys.readouterr().out.replace("\n", " ")


# ---- against Brevitas's own QONNX export of the same layer pattern --------------------------------


def _binary_scaled(w: torch.Tensor, scale: float) -> torch.Tensor:
    return w + (scale * torch.where(w >= 0, 1.0, -1.0) - w).detach()


class SignLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.act = HTAF(levels="pm1")
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.act(x), _binary_scaled(self.weight, 0.1), self.bias)


class SignConv(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.act = HTAF(levels="pm1")
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(self.act(x), _binary_scaled(self.weight, 0.1), padding=1)


def _brevitas_pair(kind: str):
    from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear
    from brevitas.quant import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

    act = QuantIdentity(act_quant=SignedBinaryActPerTensorConst)
    if kind == "linear":
        layer = QuantLinear(6, 4, bias=True, weight_quant=SignedBinaryWeightPerTensorConst)
        ours: nn.Module = SignLinear(layer.weight.data, layer.bias.data)
        shape = (6,)
    else:
        layer = QuantConv2d(3, 4, 3, padding=1, bias=False, weight_quant=SignedBinaryWeightPerTensorConst)
        ours = SignConv(layer.weight.data)
        shape = (3, 5, 5)
    return nn.Sequential(act, layer).eval(), ours.eval(), shape


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_graph_matches_a_brevitas_export_node_for_node(kind, tmp_path):
    pytest.importorskip("brevitas")
    import warnings

    from brevitas.export import export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    torch.manual_seed(1)
    theirs, ours, shape = _brevitas_pair(kind)
    reference = tmp_path / "brevitas.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        export_qonnx(theirs, torch.randn(1, *shape), str(reference))
    path = tmp_path / "ours.pt2"
    save_pt2(ours, torch.zeros(2, *shape), path)
    artifact = _export(path, tmp_path / "ours.qonnx.onnx", input_shape=list(shape)).artifact
    graphs = [onnx.load(str(p)).graph for p in (reference, artifact)]
    assert [(n.domain, n.op_type) for n in graphs[0].node] == [(n.domain, n.op_type) for n in graphs[1].node]
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    outs = []
    for graph_path in (reference, artifact):
        proto = onnx.load(str(graph_path))
        constants = {i.name for i in proto.graph.initializer}
        for value in list(proto.graph.input) + list(proto.graph.output):
            if value.name not in constants:  # a static batch for qonnx's shape inference
                value.type.tensor_type.shape.dim[0].dim_value = 1
        model = ModelWrapper(proto).transform(InferShapes())
        name = next(i.name for i in model.graph.input if i.name not in constants)
        outs.append(execute_onnx(model, {name: x})[model.graph.output[0].name])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


class FlippedNorm(nn.Module):
    """A user's batch norm with negative scales before a {0, 1} step: the fold reverses those channels."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.act = HTAF(levels="01")
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.bn(self.fc(x))))


@pytest.mark.parametrize("fmt", ["pt2", "pickle"])
def test_negative_batch_norm_scales_before_a_step_export(tmp_path, fmt):
    torch.manual_seed(0)
    model = FlippedNorm().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.copy_(torch.tensor([1.0, -1.0, 0.5, -2.0, 1.0]))
    path = tmp_path / f"flipped.{'pt2' if fmt == 'pt2' else 'pt'}"
    if fmt == "pt2":
        save_pt2(model, torch.zeros(2, 6), path)
    else:
        torch.save(model, path)
    result = _export(path, tmp_path / "flipped.qonnx.onnx", input_shape=[6], trust_pickle=fmt == "pickle")
    assert result.report.passed, result.report.failure_line()
    assert _ops(result.artifact) == {"MultiThreshold": 1}
