"""onnx-int8 on models written the way a user writes them: plain torch layers with weights binarized inline,
{0, 1} and ±1 activations, stride, dilation, groups, +1 and zero padding, a float residual, a MatMul
classifier, odd input sizes; saved as .pt2 and TorchScript. Each is exported, run on ONNX Runtime and
validated against the PyTorch reference; sabotaged files must fail and name what is wrong."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import htaf_export
from htaf_export import cli
from htaf_export.nn import HTAF

from conftest import save_pt2


def _binary(w: torch.Tensor) -> torch.Tensor:
    return w + (torch.where(w >= 0, 1.0, -1.0) - w).detach()


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 3)
            m.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


class FiringNet(nn.Module):
    """{0, 1} activations into binary convs: stride 2 with zero padding, a max pool, a dilated conv, a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.stem_norm = nn.BatchNorm2d(10)
        self.fire0 = HTAF(levels="01")
        self.k1 = nn.Parameter(torch.randn(14, 10, 3, 3))
        self.norm1 = nn.BatchNorm2d(14)
        self.fire1 = HTAF(levels="01", tie="gt")
        self.pool = nn.MaxPool2d(2)
        self.k2 = nn.Parameter(torch.randn(12, 14, 3, 3))
        self.norm2 = nn.BatchNorm2d(12)
        self.fire2 = HTAF(levels="pm1")
        self.head = nn.Parameter(torch.randn(9, 12 * 3 * 3))
        self.head_norm = nn.BatchNorm1d(9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fire0(self.stem_norm(self.stem(x)))
        h = self.fire1(self.norm1(F.conv2d(a, _binary(self.k1), stride=2, padding=1)))  # 13x11 → 7x6
        h = self.pool(h)  # → 3x3
        h = self.fire2(self.norm2(F.conv2d(h, _binary(self.k2), padding=2, dilation=2)))
        return self.head_norm(F.linear(h.flatten(1), _binary(self.head)))


class GroupResidualNet(nn.Module):
    """±1 activations: a grouped conv after a +1 pad, a binary conv added to a float shortcut, a MatMul head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.stem_norm = nn.BatchNorm2d(6)
        self.sign0 = HTAF(levels="pm1")
        self.grouped = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.grouped_norm = nn.BatchNorm2d(8)
        self.sign1 = HTAF(levels="pm1")
        self.mix = nn.Parameter(torch.randn(6, 8, 3, 3))
        self.mix_norm = nn.BatchNorm2d(6)
        self.sign2 = HTAF(levels="pm1")
        self.classifier = nn.Parameter(torch.randn(5, 6 * 9 * 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem_norm(self.stem(x))
        a = self.sign0(skip)
        h = self.sign1(self.grouped_norm(F.conv2d(F.pad(a, (1, 1, 1, 1), value=1.0), _binary(self.grouped), groups=2)))
        h = self.sign2(self.mix_norm(F.conv2d(h, _binary(self.mix), padding=1)) + skip)
        return h.flatten(1) @ _binary(self.classifier).t()


MODELS = {"firing": (FiringNet, (3, 13, 11)), "group_residual": (GroupResidualNet, (2, 9, 7))}
# the integer ops each file must hold: QLinearConv (threshold convs), MatMulInteger (dense, im2col convs)
INTEGER_OPS = {"firing": {"QLinearConv": 2, "MatMulInteger": 1},
               "group_residual": {"QLinearConv": 1, "MatMulInteger": 2}}


def _save(name: str, fmt: str, directory: Path) -> Path:
    cls, shape = MODELS[name]
    torch.manual_seed(3)
    model = _randomize_norms(cls(), seed=4)
    example = torch.randn(2, *shape)
    path = directory / f"{name}.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, path)
        else:
            torch.jit.save(torch.jit.trace(model, example), str(path))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[tuple[str, str], Path]:
    directory = tmp_path_factory.mktemp("int8")
    return {(n, f): _save(n, f, directory) for n in MODELS for f in ("pt2", "torchscript")}


def _export(path: Path, out: Path, shape) -> htaf_export.ExportResult:
    with contextlib.redirect_stdout(io.StringIO()):
        return htaf_export.export(path, "onnx-int8", out, input_shape=list(shape), device="cpu")


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_user_models_run_on_integer_ops_with_parity(saved, name, fmt, tmp_path):
    result = _export(saved[(name, fmt)], tmp_path / "m.int8.onnx", MODELS[name][1])
    report = result.report
    assert report is not None and report.passed, report.failure_line()
    proto = onnx.load(str(result.artifact))
    ops = [n.op_type for n in proto.graph.node]
    assert {op: ops.count(op) for op in INTEGER_OPS[name]} == INTEGER_OPS[name], ops
    float_convs = [n.input[1] for n in proto.graph.node if n.op_type == "Conv"]
    assert len(float_convs) == 1, "only the stem on real inputs stays a float conv"
    assert fmt != "pt2" or "stem" in float_convs[0], float_convs
    steps = [t for t in report.backends[0].tensors if t.kind == "binary"]
    assert steps and all(t.elements > 0 for t in steps)
    if fmt == "torchscript":  # no module tree to hook: its steps come from its captured graph
        assert any("captured graph run in ONNX Runtime" in n for n in report.notes)
    # the steps fed by integer sums cannot flip: exact thresholds, no float in between
    layers = {lw.layer for lw in result.conversion.rows if "(threshold)" in lw.became}
    named = [r.layer for r in result.conversion.rows]
    assert len(named) == len(set(named)), named  # one row a layer: its kernel, and how its weights are stored
    assert any("stored 1-bit" in r.note for r in result.conversion.rows if r.layer in layers)
    fed = [t for t in steps if t.layer in layers]
    assert fed and all(t.mismatched == 0 for t in fed), [(t.name, t.mismatched) for t in fed]


def _sabotaged(artifact: Path, out: Path, op: str, index: int, change) -> None:
    """Copy ``artifact`` with the constant that input ``index`` of the first ``op`` reads changed by ``change``
    (a packed weight is changed in its packed bytes)."""
    proto = onnx.load(str(artifact))
    node = next(n for n in proto.graph.node if n.op_type == op)
    name = node.input[index]
    producers = {o: n for n in proto.graph.node for o in n.output}
    while name not in {i.name for i in proto.graph.initializer}:  # follow the unpacking back to the packed bits
        name = next(i for i in producers[name].input if ".packed" in i or i in producers)
    tensor = next(i for i in proto.graph.initializer if i.name == name)
    array = numpy_helper.to_array(tensor).copy()
    change(array.reshape(-1))
    tensor.CopyFrom(numpy_helper.from_array(array, name))
    onnx.save(proto, str(out))


@pytest.mark.parametrize(("name", "what", "op", "index", "first_failing"), [
    ("firing", "packed weight bytes", "QLinearConv", 3, "fire1"),
    ("firing", "a threshold moved one step", "QLinearConv", 8, "fire1"),
    ("group_residual", "packed weight bytes", "MatMulInteger", 1, "sign2"),
])
def test_sabotaged_integer_files_fail(saved, tmp_path, capsys, name, what, op, index, first_failing):
    path = saved[(name, "pt2")]
    good = _export(path, tmp_path / "good.int8.onnx", MODELS[name][1]).artifact
    bad = tmp_path / "bad.int8.onnx"

    def change(flat: np.ndarray) -> None:
        if what == "packed weight bytes":
            flat[:8] ^= 0xFF  # 64 weights change sign
        else:  # the bias is −T: move the threshold nearest 0, which the data reaches, by one
            flat[np.argmin(np.abs(flat))] += 1

    _sabotaged(good, bad, op, index, change)
    capsys.readouterr()
    shape = ",".join(str(d) for d in MODELS[name][1])
    code = cli.main(["validate", str(path), str(bad), "--input-shape", shape, "--device", "cpu"])
    out = capsys.readouterr().out.replace("\n", " ")
    assert code == 1, out
    assert f"first failing tensor {first_failing}" in out, out


def test_streaming_and_portable_are_refused_in_one_line(tmp_path, capsys):
    sample = Path(__file__).resolve().parent.parent / "sample_models"
    assert cli.main([str(sample / "snn_mlp.pt"), "--target", "onnx-int8", "--snn-mode", "streaming",
                     "-o", str(tmp_path / "s.int8.onnx")]) == 2
    assert cli.main([str(sample / "bnn_mlp.pt"), "--target", "onnx-int8", "--portable",
                     "-o", str(tmp_path / "p.int8.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err
    assert not list(tmp_path.iterdir()), "no half-written file"


def test_the_recommendation_is_measured_on_this_machine(monkeypatch):
    from htaf_export.capture import capture
    from htaf_export.harden import harden
    from htaf_export.io import load
    from htaf_export.recommend import MIN_GAIN, MIN_SAVED_MS, recommend

    loaded = load(Path(__file__).resolve().parent.parent / "sample_models" / "bnn_cnn.pt")
    cap = capture(harden(loaded.module).model, loaded.input_shape)
    found = recommend(cap)
    ms = {t.target: t.ms for t in found.timings}
    assert set(ms) == {"onnx", "onnx-int8"} and all(v > 0 for v in ms.values())
    faster = ms["onnx-int8"] * MIN_GAIN < ms["onnx"] and ms["onnx"] - ms["onnx-int8"] >= MIN_SAVED_MS
    assert found.target == ("onnx-int8" if faster else "onnx")
    assert f"onnx-int8 {ms['onnx-int8']:.2f} ms" in found.line()
    passed_over = found.target == "onnx" and ms["onnx-int8"] < ms["onnx"]  # the line says why
    assert ("a difference this small is noise" in found.line()) == passed_over, found.line()
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert recommend(cap).target == "tflite"


def test_a_model_without_binary_layers_is_recommended_onnx_untimed_as_integer():
    """Its onnx-int8 file is the float graph again: timing both would recommend by noise."""
    from htaf_export.capture import capture
    from htaf_export.harden import harden
    from htaf_export.nn import HTAF
    from htaf_export.recommend import recommend

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), HTAF(levels="01"), torch.nn.Linear(8, 3)).eval()
    found = recommend(capture(harden(model).model, [6]))
    assert [t.target for t in found.timings] == ["onnx"] and found.target == "onnx"


def test_a_tflite_export_times_its_own_file_for_the_recommendation(tmp_path):
    sample = Path(__file__).resolve().parent.parent / "sample_models" / "bnn_mlp.pt"
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(sample, "tflite-int8", tmp_path / "m.int8.tflite", device="cpu",
                                    validate_artifact=False, recommend=True)
    ms = {t.target: t.ms for t in result.recommendation.timings}
    assert set(ms) == {"onnx", "onnx-int8", "tflite-int8"} and all(v > 0 for v in ms.values())
    assert result.recommendation.target in ms and "tflite-int8" in result.recommendation.line()


def test_export_summary_and_inspect_print_the_recommendation(capsys, tmp_path):
    sample = Path(__file__).resolve().parent.parent / "sample_models" / "bnn_mlp.pt"
    assert cli.main([str(sample), "--target", "onnx-int8", "-o", str(tmp_path / "m.int8.onnx"), "--device", "cpu"]) == 0
    assert "recommended on this machine" in capsys.readouterr().out.replace("\n", " ")
    assert cli.main(["inspect", str(sample)]) == 0
    assert "--target onnx" in capsys.readouterr().out.replace("\n", " ")


# ---- tflite-int8 --------------------------------------------------------------------------------


def _int8_convs(path: Path, op_name: str = "CONV_2D") -> int:
    from htaf_export import tflite_file as tfl

    model = tfl.read_model(path.read_bytes())
    graph = model.subgraphs[0]
    int8 = tfl.schema().TensorType.INT8
    return sum(1 for op, name in zip(graph.operators, tfl.op_names(model))
               if name == op_name and graph.tensors[int(op.inputs[1])].type == int8)


@pytest.mark.slow
def test_threshold_dense_layers_run_as_int8_fully_connected(tmp_path):
    sample = Path(__file__).resolve().parent.parent / "sample_models" / "bnn_mlp.pt"
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(sample, "tflite-int8", tmp_path / "m.int8.tflite", device="cpu")
    assert result.report.passed, result.report.failure_line()
    assert _int8_convs(result.artifact, "FULLY_CONNECTED") == 1  # fc2; fc1 reads real inputs, fc_out is affine
    assert any(r.layer == "layers.fc2" and r.became == "int8 FULLY_CONNECTED (threshold)" for r in result.conversion.rows)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "convs"), [("firing", 2)])  # its dilated conv too: one CONV_2D with dilation
def test_user_models_on_tflite_int8(saved, name, convs, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(saved[(name, "pt2")], "tflite-int8", tmp_path / "m.int8.tflite",
                                    input_shape=list(MODELS[name][1]), device="cpu")
    assert result.report is not None and result.report.passed, result.report.failure_line()
    assert _int8_convs(result.artifact) == convs
    steps = [t for t in result.report.backends[0].tensors if t.kind == "binary"]
    assert steps and all(t.elements > 0 for t in steps)


@pytest.mark.slow
def test_tflite_int8_threshold_moved_one_step_fails_and_names_the_step(tmp_path, capsys):
    from htaf_export import tflite_file as tfl

    sample = Path(__file__).resolve().parent.parent / "sample_models" / "bnn_cnn.pt"
    good = tmp_path / "m.int8.tflite"
    assert cli.main([str(sample), "--target", "tflite-int8", "-o", str(good), "--no-validate"]) == 0
    assert _int8_convs(good) == 2  # conv2, conv3; conv1 reads real inputs, fc_out has a float output
    model = tfl.read_model(good.read_bytes())
    graph = model.subgraphs[0]
    int32 = tfl.schema().TensorType.INT32
    op = next(o for o, n in zip(graph.operators, tfl.op_names(model))
              if n == "CONV_2D" and graph.tensors[int(o.inputs[2])].type == int32)
    buffer = model.buffers[graph.tensors[int(op.inputs[2])].buffer]
    bias = np.array(buffer.data, dtype=np.uint8).view(np.int32).copy()
    bias[np.argmin(np.abs(bias))] -= 1  # the bias is −T: the threshold nearest 0 moves up by one
    buffer.data = bias.view(np.uint8)
    bad = tmp_path / "bad.int8.tflite"
    bad.write_bytes(tfl.write_model(model))
    capsys.readouterr()
    assert cli.main(["validate", str(sample), str(bad)]) == 1
    assert "first failing tensor layers.act2" in capsys.readouterr().out.replace("\n", " ")


class BiasedGroupConv(nn.Module):
    """A grouped binary conv with its own bias and nothing after it: onnx-int8 runs it as a float conv."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.stem, self.sign = nn.Conv2d(2, 4, 3, padding=1), HTAF(levels="pm1")
        self.k, self.b = nn.Parameter(torch.randn(6, 4 // groups, 3, 3)), nn.Parameter(torch.randn(6) * 5)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.sign(self.stem(x)), _binary(self.k), self.b, padding=1, groups=self.groups)


class ReluBetween(nn.Module):
    """A ReLU between a binary conv and its step: TFLite fuses it into the conv, which must then stay float."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.sign = nn.Conv2d(2, 4, 3, padding=1), HTAF(levels="pm1")
        self.k, self.b = nn.Parameter(torch.randn(6, 4, 3, 3)), nn.Parameter(torch.randn(6))
        self.fire = HTAF(levels="01", threshold=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fire(torch.relu(F.conv2d(self.sign(self.stem(x)), _binary(self.k), self.b, padding=1)))


@pytest.mark.parametrize(("model", "target", "became"), [
    (BiasedGroupConv(2), "onnx-int8", "float Conv"), (BiasedGroupConv(1), "onnx-int8", "MatMulInteger (im2col) (affine)"),
    pytest.param(ReluBetween(), "tflite-int8", None, marks=pytest.mark.slow)])
def test_layers_left_float_stay_exact(model, target, became, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.pt2"
    save_pt2(model.eval(), torch.randn(2, 2, 8, 8), path)
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, target, tmp_path / f"m{'.int8.onnx' if 'onnx' in target else '.int8.tflite'}",
                                    input_shape=[2, 8, 8], device="cpu")
    assert result.report.passed, result.report.failure_line()
    if became:
        assert any(r.layer == "k" and r.became == became for r in result.conversion.rows), result.conversion.rows
    else:
        assert _int8_convs(result.artifact) == 0  # the fused ReLU keeps the conv float


def test_the_recommendation_does_not_import_tensorflow(tmp_path):
    """inspect and ONNX exports time ONNX files only: TensorFlow stays out (it costs seconds to import)."""
    import subprocess
    import sys

    sample = Path(__file__).resolve().parent.parent / "sample_models" / "bnn_cnn.pt"
    code = (f"import contextlib, io, sys\nfrom htaf_export.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    main(['inspect', {str(sample)!r}])\n"
            f"    main([{str(sample)!r}, '--target', 'onnx-int8', '-o', {str(tmp_path / 'm.int8.onnx')!r}, '--device', 'cpu'])\n"
            f"assert out.getvalue().count('recommended on this machine') == 2, out.getvalue()\n"
            f"print('TF', 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TF False" in done.stdout
