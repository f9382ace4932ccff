"""ONNX target: htaf ops with function bodies, portable mode, 1-bit weights, SNN streaming, ties, parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import htaf_export
from htaf_export.targets import TARGETS
from htaf_export import cli
from htaf_export.capture import capture
from htaf_export.converters.onnx import build
from htaf_export.ops import HTAF_DOMAIN
from conftest import tie_twin, save_pt2
from htaf_export.data import digits
from htaf_export.errors import BadInput, UnsupportedLayer
from htaf_export.models.registry import ReferenceModel
from htaf_export.nn import Step
from htaf_export.pipeline import export

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
NAMES = ["bnn_mlp", "bnn_cnn", "dhn_mlp", "snn_mlp", "icbm_cnn"]


def session(path_or_bytes) -> ort.InferenceSession:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=[False, True], ids=["htaf", "portable"])
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {name: export(SAMPLES / f"{name}.pt", "onnx", out / f"{name}.onnx", portable=request.param)
            for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_every_sample_model_passes_parity(exported, name):
    result = exported[name]
    report = result.report
    assert report is not None and report.passed, report.first_failure
    backend = report.backends[0]
    assert backend.backend == "onnxruntime-cpu"
    assert backend.samples >= 1797
    binary = [t for t in backend.tensors if t.kind == "binary"]
    assert binary, "every family has step tensors to compare"
    assert sum(t.unexplained for t in binary) == 0
    assert all(t.max_abs_error <= 1e-5 for t in backend.tensors if t.kind == "float")
    assert backend.data.agree == backend.data.samples


@pytest.mark.parametrize("name", NAMES)
def test_artifact_is_valid_onnx_with_expected_ops(exported, name):
    result = exported[name]
    proto = onnx.load(str(result.artifact))
    onnx.checker.check_model(proto, full_check=True)
    portable = dict((p.key, p.value) for p in proto.metadata_props)["htaf_export.mode"] == "portable"
    domains = {n.domain for n in proto.graph.node}
    if portable:
        assert HTAF_DOMAIN not in domains and not proto.functions
    else:
        assert HTAF_DOMAIN in domains
        assert {f.name for f in proto.functions} == {n.op_type for n in proto.graph.node if n.domain == HTAF_DOMAIN}
    assert proto.opset_import[0].version >= 18 or any(o.domain == "" and o.version >= 18 for o in proto.opset_import)


def test_step_outputs_are_named_after_sites(exported):
    names = [t.name for t in exported["bnn_cnn"].report.backends[0].tensors if t.kind == "binary"]
    assert names == ["layers.act1", "layers.act2", "layers.act3"]
    icbm = [t.name for t in exported["icbm_cnn"].report.backends[0].tensors]
    assert "concepts" in icbm and "logits" in icbm


def test_batch_dimension_is_dynamic(exported):
    sess = session(exported["bnn_cnn"].artifact)
    x = digits("test", [1, 8, 8]).x
    for batch in (1, 7, 64):
        assert sess.run(None, {"input": x[:batch]})[0].shape == (batch, 10)


def test_binary_weights_are_packed_within_ten_percent_of_floor(exported):
    for name in ("bnn_mlp", "bnn_cnn"):
        result = exported[name]
        conv = result.conversion
        assert conv.binary_floor_bytes > 0
        assert conv.binary_stored_bytes / conv.binary_floor_bytes <= 1.1
        proto = onnx.load(str(result.artifact))
        packed = [i for i in proto.graph.initializer if i.name.endswith(".packed")]
        assert packed and all(i.data_type == onnx.TensorProto.UINT8 for i in packed)
        # No float ±1 weight tensor is left in the file.
        for init in proto.graph.initializer:
            arr = onnx.numpy_helper.to_array(init)
            assert not (arr.dtype == np.float32 and arr.size >= 64 and np.all(np.abs(arr) == 1))


def test_export_is_byte_identical_and_carries_metadata(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        export(SAMPLES / "bnn_mlp.pt", "onnx", out, validate_artifact=False)
    assert a.read_bytes() == b.read_bytes()
    meta = {p.key: p.value for p in onnx.load(str(a)).metadata_props}
    assert meta["htaf_export.version"] == htaf_export.__version__
    assert meta["htaf_export.source_sha256"] == htaf_export.io.file_sha256(SAMPLES / "bnn_mlp.pt")
    assert meta["htaf_export.tie"] == "ge"
    assert [s["site"] for s in json.loads(meta["htaf_export.steps"])] == ["layers.act1", "layers.act2"]


def test_snn_streaming_matches_unrolled_model(tmp_path):
    loaded = htaf_export.load(SAMPLES / "snn_mlp.pt")
    result = export(loaded, "onnx", tmp_path / "stream.onnx", snn_mode="streaming")
    assert result.report.passed
    sess = session(result.artifact)
    names = [i.name for i in sess.get_inputs()]
    assert names[0] == "input" and all(n.endswith(".v") for n in names[1:]) and len(names) == 3
    model = result.hardening.model
    x = digits("test", loaded.input_shape).x[:50]
    state = [np.zeros((len(x), h), np.float32) for h in model.hidden]
    total = 0
    for _ in range(model.steps):
        out, *state = sess.run(None, {"input": x, **dict(zip(names[1:], state))})
        total = total + out
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(total / model.steps, expected, atol=1e-5, rtol=1e-5)


class TieModel(ReferenceModel):
    """y = W·x with small integer weights, so integer inputs put pre-activations exactly on 0."""

    family = "dhn"
    output_names = ("logits", "bits")

    def __init__(self, levels: str, tie: str, flip_bn: bool) -> None:
        super().__init__({}, [4])
        self.fc = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 1.0, -2.0, 1.0], [2.0, 0.0, 0.0, -1.0]]))
        # var + eps = (1 − 2⁻²⁰) + 2⁻²⁰ = 1 exactly makes σ exactly 1 (torch before 2.13 refuses eps = 0);
        # γ=−1 makes the folded comparison flip direction.
        self.bn = nn.BatchNorm1d(3, eps=2.0 ** -20)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([-1.0 if flip_bn else 1.0, 1.0, 2.0]))
            self.bn.running_mean.zero_()
            self.bn.running_var.fill_(1.0 - 2.0 ** -20)
        self.bn.eval()
        self.step = Step(0.0, levels, tie)  # type: ignore[arg-type]
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        bits = self.step(self.bn(self.fc(x)))
        return self.head(bits), bits


@pytest.mark.parametrize("portable", [False, True], ids=["htaf", "portable"])
@pytest.mark.parametrize("levels", ["01", "pm1"])
@pytest.mark.parametrize("flip_bn", [False, True], ids=["bn+", "bn-"])
def test_ties_follow_the_declared_rule(portable, levels, flip_bn):
    x = np.array([[1, 1, 1, 1], [2, 2, 1, 0], [1, 2, 0, 2], [3, 1, 2, 1], [0, 0, 0, 0]], dtype=np.float32)
    for tie in ("ge", "gt"):
        model = TieModel(levels, tie, flip_bn).eval()
        pre = model.bn(model.fc(torch.from_numpy(x))).detach().numpy()
        assert (pre == 0).sum() >= 5, "the inputs must land exactly on the threshold"
        art = build(capture(model, [4], model.output_names), {}, portable=portable)
        bits = session(art.serialized()).run(["bits"], {"input": x})[0]
        on, off = (1.0, 0.0) if levels == "01" else (1.0, -1.0)
        fired = pre >= 0 if tie == "ge" else pre > 0
        np.testing.assert_array_equal(bits, np.where(fired, on, off))
        at_tie = bits[pre == 0]
        assert np.all(at_tie == (on if tie == "ge" else off))


class TwoTies(nn.Module):
    """The same pre-activations through a ge step and a gt step: each site keeps its own rule."""

    def __init__(self, levels: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 1.0, -2.0, 1.0], [2.0, 0.0, 0.0, -1.0]]))
        self.fires_at_tie = Step(0.0, levels, "ge")  # type: ignore[arg-type]
        self.quiet_at_tie = Step(0.0, levels, "gt")  # type: ignore[arg-type]

    def forward(self, x):
        u = self.fc(x)
        return self.fires_at_tie(u), self.quiet_at_tie(u)


@pytest.mark.parametrize("portable", [False, True], ids=["htaf", "portable"])
@pytest.mark.parametrize("levels", ["01", "pm1"])
def test_each_site_keeps_its_own_tie_rule(portable, levels):
    x = np.array([[1, 1, 1, 1], [2, 2, 1, 0], [1, 2, 0, 2], [3, 1, 2, 1], [0, 0, 0, 0]], dtype=np.float32)
    model = TwoTies(levels).eval()
    cap = capture(model, [4], ["ge_bits", "gt_bits"])
    assert {s.site: s.tie for s in cap.steps} == {"fires_at_tie": "ge", "quiet_at_tie": "gt"}
    art = build(cap, {}, portable=portable)
    if not portable:
        assert sorted((f.name, f.overload) for f in art.proto.functions) == [
            (f"{'Heaviside' if levels == '01' else 'Sign'}", tie) for tie in ("ge", "gt")]
    ge, gt = session(art.serialized()).run(["ge_bits", "gt_bits"], {"input": x})
    pre = x @ model.fc.weight.detach().numpy().T
    assert (pre == 0).sum() >= 5, "the inputs must land exactly on the threshold"
    on, off = (1.0, 0.0) if levels == "01" else (1.0, -1.0)
    np.testing.assert_array_equal(ge, np.where(pre >= 0, on, off))
    np.testing.assert_array_equal(gt, np.where(pre > 0, on, off))


class Unsupported(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x.reshape(-1, 8, 8)).real.reshape(x.shape[0], -1)


class WithUnsupported(ReferenceModel):
    family = "dhn"

    def __init__(self) -> None:
        super().__init__({}, [64])
        self.fc = nn.Linear(64, 64)
        self.odd = Unsupported()

    def forward(self, x):
        return self.odd(self.fc(x))


def test_layer_that_cannot_be_expressed_is_named(tmp_path):
    model = WithUnsupported().eval()
    with pytest.raises(UnsupportedLayer) as info:
        capture(model, [64])
    assert "odd" in str(info.value) and "linalg_eig" in str(info.value)
    path = tmp_path / "odd.pt"
    torch.save(model, path)
    out = tmp_path / "odd.onnx"
    assert cli.main([str(path), "--target", "onnx", "-o", str(out), "--trust-pickle"]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_unwritable_output_gives_exit_2_and_leaves_nothing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (blocker / "x.onnx", tmp_path / "missing" / "x.onnx"):
        assert cli.main([str(SAMPLES / "dhn_mlp.pt"), "--target", "onnx", "-o", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("htaf-export: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_output_folder_gets_the_default_name(tmp_path):
    result = export(SAMPLES / "dhn_mlp.pt", "onnx-int8", tmp_path, validate_artifact=False)
    assert result.artifact == tmp_path / "dhn_mlp.int8.onnx" and result.artifact.is_file()


def test_failure_during_conversion_leaves_no_file(tmp_path, monkeypatch):
    import htaf_export.pipeline as pipeline

    def broken(*args, **kwargs):
        raise BadInput("simulated converter failure")

    monkeypatch.setattr(pipeline, "convert", broken)
    out = tmp_path / "x.onnx"
    with pytest.raises(BadInput):
        export(SAMPLES / "dhn_mlp.pt", "onnx", out)
    assert list(tmp_path.iterdir()) == []


def test_wrong_suffix_is_refused(tmp_path):
    with pytest.raises(BadInput, match="must end in .onnx"):
        export(SAMPLES / "dhn_mlp.pt", "onnx", tmp_path / "x.tflite")


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no ONNX Runtime CUDA provider")
def test_cuda_provider_parity(exported):
    for name in NAMES:
        backends = {b.backend: b for b in exported[name].report.backends}
        assert backends["onnxruntime-cuda"].passed


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_traced_programs_get_their_steps_lifted_to_htaf_ops(tmp_path, fmt):
    loaded = htaf_export.load(SAMPLES / "bnn_mlp.pt")
    hardened = htaf_export.harden(loaded.module).model
    hardened.input_shape, hardened.family, hardened.output_names = loaded.input_shape, "bnn", loaded.output_names
    source = htaf_export.save(hardened, tmp_path / f"m.{fmt}", format=fmt)
    result = export(source, "onnx", tmp_path / "m.onnx")
    assert result.report.passed
    proto = onnx.load(str(result.artifact))
    steps = [n for n in proto.graph.node if n.domain == HTAF_DOMAIN]
    assert [(n.op_type, n.output[0]) for n in steps] == [("Sign", "layers.act1"), ("Sign", "layers.act2")]
    # Same decisions as the checkpoint's own export.
    x = digits("test", loaded.input_shape).x
    direct = export(SAMPLES / "bnn_mlp.pt", "onnx", tmp_path / "direct.onnx", validate_artifact=False)
    np.testing.assert_array_equal(session(result.artifact).run(["logits"], {"input": x})[0].argmax(1),
                                  session(direct.artifact).run(["logits"], {"input": x})[0].argmax(1))


def test_python_validate_returns_the_report(exported, tmp_path):
    report = htaf_export.validate(SAMPLES / "dhn_mlp.pt", exported["dhn_mlp"].artifact)
    assert report.passed and report.backends[0].samples >= 1797
    # A model that is not the one exported (its sites declare the other tie rule): the report says so.
    other = htaf_export.validate(tie_twin("dhn_mlp", "gt", tmp_path), exported["dhn_mlp"].artifact)
    assert not other.passed


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_same_model_and_flags_give_the_same_bytes(target, tmp_path):
    """Three exports, one hash: nothing measured at export time (such as LCE kernel timings) is in the file."""
    import hashlib

    hashes = set()
    for k in range(3):
        out = tmp_path / f"m{k}{TARGETS[target].default_suffix}"
        # NIR carries 0/1 neurons only: its sample is the deep Heaviside network
        export(SAMPLES / ("dhn_mlp.pt" if target == "nir" else "bnn_mlp.pt"), target, out, validate_artifact=False)
        hashes.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(hashes) == 1


class ZeroSigns(torch.nn.Module):
    """A conv binarized inline with torch.sign, where 8 weights are exactly 0: three values, not binary."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(8 * 8 * 8, 4)
        with torch.no_grad():
            self.c2.weight[:, 0, 1, 1] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(self.c1(x) >= 0, 1.0, -1.0)
        x = torch.where(torch.nn.functional.conv2d(x, torch.sign(self.c2.weight), padding=1) >= 0, 1.0, -1.0)
        return self.fc(x.flatten(1))


def test_weights_with_exact_zeros_say_so_in_the_summary(tmp_path):
    path = tmp_path / "zeros.pt2"
    save_pt2(ZeroSigns().eval(), torch.randn(2, 1, 8, 8), path)
    result = htaf_export.export(path, "onnx", tmp_path / "z.onnx", validate_artifact=False)
    row = next(r for r in result.conversion.rows if "exactly 0" in r.note)
    assert row.layer == "c2" and row.became == "float weights" and "8 weights" in row.note
