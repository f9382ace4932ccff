"""Patterns users write that earlier rounds refused or broke: per-unit thresholds held in parameters,
torch.heaviside, time-first stacked outputs, a None among the outputs, snnTorch's zero reset (which
computes the previous spike twice), a TorchScript capture failure, and the project's own LIF with a
zero reset under derived tolerances."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import htaf_export
from htaf_export import cli
from htaf_export.nn import LIF

from conftest import save_pt2


class PerUnitThresholds(nn.Module):
    """A deep Heaviside network whose thresholds are learned, one per unit, and a heaviside step."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(20, 12), nn.Linear(12, 9), nn.Linear(9, 7), nn.Linear(7, 4)
        self.t1 = nn.Parameter(torch.linspace(-0.3, 0.3, 12))
        self.t2 = nn.Parameter(torch.linspace(-0.2, 0.2, 9))
        self.t3 = nn.Parameter(torch.zeros(7))

    def forward(self, x):
        h = (self.l1(x) >= self.t1).float()
        h = (self.l2(h) > self.t2).float()
        h = torch.heaviside(self.l3(h) - self.t3, torch.tensor(1.0))
        return self.l4(h)


@pytest.fixture(scope="module")
def per_unit(tmp_path_factory):
    torch.manual_seed(3)
    model = PerUnitThresholds().eval()
    folder = tmp_path_factory.mktemp("per_unit")
    return save_pt2(model, torch.randn(2, 20), folder / "dhn.pt2"), model


def test_per_unit_thresholds_and_heaviside_are_step_sites(per_unit, capsys):
    path, _ = per_unit
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("per-unit") == 2 and "x − t1" in out and "x − t2" in out, out


@pytest.mark.parametrize("target", ["onnx", "tflite-float", "tflite-int8"])
def test_per_unit_thresholds_export_with_their_steps_checked(per_unit, target, tmp_path, capsys):
    path, _ = per_unit
    out = tmp_path / f"dhn.{'onnx' if target == 'onnx' else 'tflite'}"
    report = tmp_path / "r.json"
    rc = cli.main([str(path), "--target", target, "-o", str(out), "--device", "cpu", "--report", str(report)])
    capsys.readouterr()
    assert rc == 0
    steps = [t for t in json.loads(report.read_text())["backends"][0]["tensors"] if t["kind"] == "binary"]
    assert len(steps) == 3 and all(t["elements"] > 0 for t in steps)


def test_a_moved_per_unit_threshold_fails_at_its_step(per_unit, tmp_path, capsys):
    path, model = per_unit
    artifact = tmp_path / "dhn.onnx"
    assert cli.main([str(path), "--target", "onnx", "-o", str(artifact), "--no-validate"]) == 0
    moved = PerUnitThresholds()
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        moved.t2 += 0.5
    capsys.readouterr()
    rc = cli.main(["validate", str(save_pt2(moved.eval(), torch.randn(2, 20), tmp_path / "moved.pt2")), str(artifact),
                   "--device", "cpu"])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 1 and "first failing tensor step1" in out, out


class TimeFirst(nn.Module):
    """Spikes of every time step stacked first, [T, batch, classes], as snnTorch tutorials write them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        v, spikes = torch.zeros(x.shape[0], 6), []
        for _ in range(3):
            v = 0.9 * v + self.fc(x)
            s = (v > 1.0).float()
            v = v * (1 - s)
            spikes.append(s)
        return torch.stack(spikes)


class NoneAmongOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        return (self.fc(x) >= 0).float(), None


def test_outputs_validation_cannot_read_are_refused_in_one_line(tmp_path, capsys):
    path = save_pt2(NoneAmongOutputs().eval(), torch.randn(2, 16), tmp_path / "m.pt2")
    out = tmp_path / "m.onnx"
    rc = cli.main([str(path), "--target", "onnx", "-o", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "returns NoneType values besides tensors" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["pt2", "pickle"])
def test_time_first_stacked_outputs_are_returned_batch_first_with_a_note(fmt, tmp_path):
    """[T, batch, classes] out of a batch-first input: the artifact returns [batch, T, classes], and says so."""
    torch.manual_seed(0)
    model, path = TimeFirst().eval(), tmp_path / ("m.pt2" if fmt == "pt2" else "m.pt")
    save_pt2(model, torch.randn(2, 16), path) if fmt == "pt2" else torch.save(model, path)
    result = htaf_export.export(path, "onnx", tmp_path / "m.onnx", input_shape=[16], trust_pickle=True,
                                device="cpu")
    assert result.report.passed
    assert any("output 'logits' has the batch first, the model's on axis 1" in n for n in result.conversion.notes)
    dims = onnx.load(tmp_path / "m.onnx").graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 6]


def test_snntorch_zero_reset_exports_a_valid_onnx_file(tmp_path, capsys):
    snn = pytest.importorskip("snntorch")

    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 12), nn.Linear(12, 5)
            self.lif1 = snn.Leaky(beta=0.8, reset_mechanism="zero")
            self.lif2 = snn.Leaky(beta=0.8, reset_mechanism="zero")

        def forward(self, x):
            m1, m2, count = self.lif1.init_leaky(), self.lif2.init_leaky(), 0
            for _ in range(4):
                s1, m1 = self.lif1(self.fc1(x), m1)
                s2, m2 = self.lif2(self.fc2(s1), m2)
                count = count + s2
            return count

    torch.manual_seed(0)
    path = tmp_path / "leaky.pt2"
    torch.export.save(torch.export.export(Leaky().eval(), (torch.randn(1, 16),)), path)
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "leaky.onnx"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err


def test_a_failed_torchscript_capture_prints_one_line(tmp_path, capfd):
    class Heavi(nn.Module):
        def forward(self, x):
            return torch.heaviside(x, torch.tensor(1.0))

    path = tmp_path / "h.pt"
    torch.jit.save(torch.jit.trace(Heavi(), torch.randn(2, 5)), path)
    capfd.readouterr()
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "h.onnx"), "--input-shape", "5"])
    out, err = capfd.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Torch IR graph" not in out + err, out + err


def test_a_zero_reset_lif_gets_derived_tolerances(tmp_path, capsys):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(10, 6)
            self.lif = LIF(leak=0.75, threshold=0.5, reset="zero")

        def forward(self, x):
            v, count = torch.zeros(x.shape[0], 6), 0
            for _ in range(3):
                s, v = self.lif(self.fc(x), v)
                count = count + s
            return count

    torch.manual_seed(1)
    path = save_pt2(Net().eval(), torch.randn(2, 10), tmp_path / "lif.pt2")
    report = tmp_path / "r.json"
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "lif.onnx"), "--device", "cpu",
                   "--report", str(report)])
    capsys.readouterr()
    data = json.loads(report.read_text())
    assert rc == 0 and data["tolerance"]["derived"] is True, data["notes"]


class TimeSteps(nn.Module):
    """A recurrent spiking loop over its input's time axis, x[:, t] for an input [time, features] per sample;
    the recurrent layer first reads the zero initial spikes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.rec, self.head = nn.Linear(9, 7), nn.Linear(7, 7, bias=False), nn.Linear(7, 3)

    def forward(self, x):
        v, s, count = torch.zeros(x.shape[0], 7), torch.zeros(x.shape[0], 7), 0
        for t in range(x.shape[1]):
            v = 0.8 * v + self.fc(x[:, t]) + self.rec(s)
            s = (v >= 0.5).float()
            v = v * (1 - s)
            count = count + s
        return self.head(count)


@pytest.mark.parametrize("target", ["tflite", "tflite-float"])
def test_a_recurrent_loop_over_the_input_time_axis_exports_to_tflite(target, tmp_path, capsys):
    torch.manual_seed(2)
    path = save_pt2(TimeSteps().eval(), torch.randn(2, 5, 9), tmp_path / "seq.pt2")
    report = tmp_path / "r.json"
    rc = cli.main([str(path), "--target", target, "-o", str(tmp_path / "seq.tflite"), "--device", "cpu",
                   "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 0, err
    steps = [t for t in json.loads(report.read_text())["backends"][0]["tensors"] if t["kind"] == "binary"]
    assert len(steps) == 5 and all(t["elements"] > 0 and t["mismatched"] == t["explained"] for t in steps)


class SignMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.sign(self.l1(x)))


def test_an_op_tflite_micro_lacks_skips_that_runtime_with_its_reason(tmp_path, capfd):
    pytest.importorskip("tflite_micro")
    torch.manual_seed(4)
    path = save_pt2(SignMlp().eval(), torch.randn(2, 12), tmp_path / "sign.pt2")
    rc = cli.main([str(path), "--target", "tflite-float", "-o", str(tmp_path / "sign.tflite")])
    out, err = capfd.readouterr()
    assert rc == 0 and "not run: tflite-micro (TFLite Micro has no kernel for SIGN)" in " ".join(out.split()), out
    assert "Didn't find op" not in out + err


class OnesLikeSignMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.l1(x)
        return self.l2(torch.where(h >= 0, torch.ones_like(h), -torch.ones_like(h)))


def test_a_torchscript_ones_like_sign_is_a_step_on_tflite(tmp_path, capsys):
    torch.manual_seed(4)
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(OnesLikeSignMlp().eval(), torch.randn(2, 12)), path)
    report = tmp_path / "r.json"
    rc = cli.main([str(path), "--target", "tflite", "-o", str(tmp_path / "m.tflite"), "--input-shape", "12",
                   "--device", "cpu", "--report", str(report)])
    assert rc == 0, capsys.readouterr().err
    steps = [t for t in json.loads(report.read_text())["backends"][0]["tensors"] if t["kind"] == "binary"]
    assert len(steps) == 1 and steps[0]["elements"] > 0


def test_the_projects_binary_layers_trace_and_save_as_torchscript(tmp_path, capsys):
    from htaf_export.nn import BinaryLinear, HTAF

    model = nn.Sequential(nn.Linear(12, 16), HTAF(levels="pm1"), BinaryLinear(16, 5)).eval()
    path = tmp_path / "bin.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, torch.randn(2, 12)), path)
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "bin.onnx"), "--input-shape", "12",
                   "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(20, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc((self.embed(ids).mean(1) >= 0).float())


class LocalNorm(nn.Module):
    """AlexNet-era local response normalization before a step: no TFLite translation here."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3), nn.LocalResponseNorm(2)

    def forward(self, x):
        return (self.norm(self.conv(x)) >= 0).float().flatten(1)


class Resampled(nn.Module):
    """Bilinear resizing of a binary map, antialiased or by a fractional scale."""

    def __init__(self, antialias: bool, scale: float) -> None:
        super().__init__()
        self.conv, self.antialias, self.scale = nn.Conv2d(1, 2, 3, padding=1), antialias, scale

    def forward(self, x):
        h = (self.conv(x) >= 0).float()
        return F.interpolate(h, scale_factor=self.scale, mode="bilinear", antialias=self.antialias).flatten(1)


@pytest.mark.parametrize("model, example, target, words", [
    (Tokens(), torch.randint(0, 20, (2, 5)), "onnx", "takes integer inputs (token ids for an nn.Embedding?)"),
    (LocalNorm(), torch.randn(2, 1, 6, 6), "tflite-float", "from module norm"),
    (Resampled(True, 0.5), torch.randn(2, 1, 8, 8), "tflite-float", "antialiased resizing (antialias=True)"),
    (Resampled(False, 1.3), torch.randn(2, 1, 8, 8), "tflite-float", "a scale that gives no whole size"),
])
def test_refusals_name_what_the_user_wrote(model, example, target, words, tmp_path, capsys):
    path = tmp_path / "m.pt2"
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    out = tmp_path / f"m.{'onnx' if target == 'onnx' else 'tflite'}"
    rc = cli.main([str(path), "--target", target, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


class OddPools(nn.Module):
    """Bi-Real / ReActNet downsampling on odd sizes: pools with ceil_mode, padding, and both counting rules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pools = nn.ModuleList([nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                                    nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False), nn.AvgPool2d(3, 2, 1),
                                    nn.AvgPool2d(2, ceil_mode=True), nn.MaxPool2d(3, 2, 1, ceil_mode=True)])
        self.head = nn.Linear(6 * 4 * 4 * 5, 3)

    def forward(self, x):
        h = torch.where(self.conv(x) >= 0, 1.0, -1.0)
        return self.head(torch.cat([p(h).flatten(1) for p in self.pools], 1))


@pytest.mark.parametrize("target", ["tflite", "tflite-float"])
def test_pools_with_ceil_mode_and_padding_convert_to_tflite(target, tmp_path, capsys):
    torch.manual_seed(6)
    model = OddPools().eval()
    path = save_pt2(model, torch.randn(2, 2, 7, 9), tmp_path / "pools.pt2")
    rc = cli.main([str(path), "--target", target, "-o", str(tmp_path / "pools.tflite"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().out[-2000:]


def sign_ste(x):
    return x + (torch.where(x >= 0, 1.0, -1.0) - x).detach()


class ReActStyle(nn.Module):
    """ReActNet-style: RSign (a learned per-channel shift, then a straight-through sign written by hand), a binary
    conv on it, RPReLU, and a dilated depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, 8).reshape(1, 8, 1, 1))
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.prelu = nn.PReLU(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.head = nn.Linear(8 * 9 * 11, 3)

    def forward(self, x):
        h = sign_ste(self.stem(x) - self.shift)
        h = self.prelu(self.bn(nn.functional.conv2d(h, sign_ste(self.conv.weight), None, padding=1)))
        return self.head(self.dw(h).flatten(1))


@pytest.fixture(scope="module")
def react(tmp_path_factory):
    torch.manual_seed(8)
    model = ReActStyle()
    model.bn.running_mean.uniform_(-2, 2)
    model.bn.running_var.uniform_(0.5, 2)
    folder = tmp_path_factory.mktemp("react")
    return save_pt2(model.eval(), torch.randn(2, 1, 9, 11) * 30, folder / "react.pt2")


@pytest.mark.parametrize("target, binary_kernel", [("onnx", ""), ("onnx-int8", "MatMulInteger"), ("tflite", "LceBconv2d"),
                                                   ("tflite-float", "")])
def test_a_straight_through_sign_is_the_step_it_rounds_to(react, target, binary_kernel, tmp_path, capsys):
    out = tmp_path / f"react.{'tflite' if 'tflite' in target else 'onnx'}"
    rc = cli.main([str(react), "--target", target, "-o", str(out), "--device", "cpu", "--data",
                   str(_large_inputs(tmp_path))])
    text = capsys.readouterr().out
    assert rc == 0 and binary_kernel in text, text[-3000:]


def _large_inputs(folder):
    # inputs up to ~100: x + (sign(x) − x) is then ±1 only up to the rounding of x, which the step is not
    import numpy as np

    path = folder / "large.npz"
    np.savez(path, x=(np.random.default_rng(0).standard_normal((64, 1, 9, 11)) * 30).astype(np.float32))
    return path


class SharedSmoothHtaf(nn.Module):
    """One smooth HTAF module called after two layers: TorchScript traces it into two methods."""

    def __init__(self) -> None:
        super().__init__()
        from htaf_export.nn import HTAF

        self.l1, self.l2, self.l3 = nn.Linear(10, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = HTAF(mode="smooth")

    def forward(self, x):
        return self.l3(self.act(self.l2(self.act(self.l1(x)))))


def test_every_call_of_a_shared_torchscript_htaf_is_hardened(tmp_path, capsys):
    import onnx

    path = tmp_path / "shared.pt"
    torch.jit.save(torch.jit.trace(SharedSmoothHtaf().eval(), torch.randn(2, 10)), path)
    out = tmp_path / "shared.onnx"
    rc = cli.main([str(path), "--target", "onnx", "-o", str(out), "--input-shape", "10", "--device", "cpu",
                   "--portable"])
    assert rc == 0, capsys.readouterr().err
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "Sigmoid" not in ops and "Tanh" not in ops, ops


def test_workers_import_a_pickled_models_class_from_the_current_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_net.py").write_text(
        "from torch import nn\nfrom htaf_export.nn import HTAF\n\n\nclass UserNet(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.fc, self.act, self.out = nn.Linear(6, 5), HTAF(), nn.Linear(5, 2)\n\n"
        "    def forward(self, x):\n        return self.out(self.act(self.fc(x)))\n")
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        import user_net  # noqa: E402 - written just above

        torch.save(user_net.UserNet().eval(), tmp_path / "net.pt")
    finally:  # as in a fresh shell: the class importable only from the current directory
        sys.path.remove(str(tmp_path))
        sys.modules.pop("user_net", None)
    # the installed command, as a user runs it (``python -m`` or pytest would put the directory on the path)
    command = [str(Path(sys.executable).parent / "htaf-export"), "net.pt", "--trust-pickle", "--input-shape", "6",
               "--target", "onnx", "-o", "net.onnx", "--device", "cpu", "--workers", "2"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path):
    import errno

    from htaf_export.errors import BadInput
    from htaf_export.files import atomic_write

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BadInput, match="cannot write .*No space left on device"):
        atomic_write(tmp_path / "m.onnx", full)
    assert list(tmp_path.iterdir()) == []


def test_labels_alone_are_not_taken_for_inputs(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "labels.npz", y=np.arange(10))
    path = save_pt2(TimeSteps().eval(), torch.randn(2, 5, 9), tmp_path / "m.pt2")
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "labels.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "must hold the inputs under key 'x'" in err, err


def test_labels_beyond_the_models_classes_are_said(tmp_path, capsys):
    import numpy as np

    path = save_pt2(TimeSteps().eval(), torch.randn(2, 5, 9), tmp_path / "m.pt2")  # 3 classes
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((20, 5, 9)).astype(np.float32), y=np.arange(20) % 10)
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                   "--device", "cpu"])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0 and "the labels go up to 9, but output 'logits' has 3 values: no accuracy is reported" in out, out


def test_a_torchscript_straight_through_sign_is_the_step_too(tmp_path, capsys):
    torch.manual_seed(8)
    path = tmp_path / "react.pt"
    torch.jit.save(torch.jit.trace(ReActStyle().eval(), torch.randn(2, 1, 9, 11)), path)
    rc = cli.main([str(path), "--target", "tflite", "-o", str(tmp_path / "react.tflite"), "--input-shape", "1,9,11",
                   "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "LceBconv2d" in out, out[-3000:]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img, self.side, self.head = nn.Linear(12, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, img, side):
        return self.head((self.img(img) + self.side(side) >= 0).float())


def test_assert_parity_takes_a_model_with_two_inputs(tmp_path):
    import htaf_export
    from htaf_export.testing import assert_parity

    torch.manual_seed(9)
    path = htaf_export.save(TwoInputs().eval(), tmp_path / "two.pt2", input_shape=[[12], [4]])
    htaf_export.export(path, "onnx", tmp_path / "two.onnx")
    assert_parity(path, tmp_path / "two.onnx")


@pytest.mark.parametrize("call, words", [
    (lambda h, p: h.harden(h.load(p)), "harden takes an nn.Module, not LoadedModel (pass loaded.module"),
    (lambda h, p: h.export(p, "onnx", p.with_suffix(".onnx"), input_shape=64), "input_shape must be a sequence"),
])
def test_api_mistakes_raise_the_tools_own_errors(call, words, tmp_path):
    import htaf_export
    from htaf_export.errors import BadInput

    path = save_pt2(TimeSteps().eval(), torch.randn(2, 5, 9), tmp_path / "m.pt2")
    with pytest.raises(BadInput, match=re.escape(words)):
        call(htaf_export, path)


def test_a_pickled_model_with_a_hand_written_htaf_is_hardened(tmp_path, capsys):
    import onnx

    (tmp_path / "icbm_net.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Concepts(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.enc, self.head = nn.Linear(64, 6), nn.Linear(6, 3)\n\n"
        "    def forward(self, x):\n        u = self.enc(x)\n"
        "        c = torch.sigmoid(2.0 * u + 4.0 * torch.tanh(u))\n        return self.head(c), c\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import icbm_net  # noqa: E402 - written just above

        torch.manual_seed(3)
        torch.save(icbm_net.Concepts().eval(), tmp_path / "icbm.pt")
        out = tmp_path / "icbm.onnx"
        rc = cli.main([str(tmp_path / "icbm.pt"), "--trust-pickle", "--input-shape", "64", "--target", "onnx",
                       "-o", str(out), "--device", "cpu", "--portable"])
        err = capsys.readouterr().err
        assert rc == 0, err
        ops = [n.op_type for n in onnx.load(out).graph.node]
        assert "Sigmoid" not in ops and "Tanh" not in ops, ops
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("icbm_net", None)


class BinaryNetStyle(nn.Module):
    """BinaryNet's reference code: a bias added with expand_as after a binary dense layer, batch norm, Hardtanh,
    sign, and LogSoftmax at the end; a squeeze-and-excite gate on a conv branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 4)
        self.fc1, self.fc2 = nn.Linear(256, 32, bias=False), nn.Linear(32, 10, bias=False)
        self.bias1 = nn.Parameter(torch.linspace(-1, 1, 32))
        self.bn1 = nn.BatchNorm1d(32)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y * torch.sigmoid(self.gate(y.mean((2, 3))))[:, :, None, None]  # squeeze and excite
        h = torch.where(y.flatten(1) >= 0.5, 1.0, -1.0)
        w = torch.where(self.fc1.weight >= 0, 1.0, -1.0)
        out = h @ w.t()
        out = out + self.bias1.view(1, -1).expand_as(out)
        h = torch.where(nn.functional.hardtanh(self.bn1(out)) >= 0, 1.0, -1.0)
        return torch.log_softmax(self.fc2(h), 1)


@pytest.mark.parametrize("target", ["tflite", "tflite-float"])
def test_binarynet_reference_code_exports_with_derived_tolerances(target, tmp_path, capsys):
    torch.manual_seed(10)
    model = BinaryNetStyle()
    model.bn1.running_mean.uniform_(-3, 3)
    path = save_pt2(model.eval(), torch.randn(2, 1, 8, 8), tmp_path / "bn.pt2")
    report = tmp_path / "r.json"
    rc = cli.main([str(path), "--target", target, "-o", str(tmp_path / "bn.tflite"), "--device", "cpu",
                   "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert json.loads(report.read_text())["tolerance"]["derived"] is True


class HardtanhBeforeSign(nn.Module):
    """BinaryNet's order: binary conv → batch norm → Hardtanh → sign."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 8 * 8, 3)

    def forward(self, x):
        h = torch.where(nn.functional.hardtanh(self.stem(x)) >= 0, 1.0, -1.0)
        h = nn.functional.conv2d(h, torch.where(self.conv.weight >= 0, 1.0, -1.0), None, padding=1)
        return self.head(torch.where(nn.functional.hardtanh(self.bn(h)) >= 0, 1.0, -1.0).flatten(1))


def test_a_hardtanh_before_a_sign_lets_the_batch_norm_fold_into_an_integer_threshold(tmp_path, capsys):
    torch.manual_seed(11)
    model = HardtanhBeforeSign()
    model.bn.running_mean.uniform_(-4, 4)
    path = save_pt2(model.eval(), torch.randn(2, 1, 8, 8), tmp_path / "ht.pt2")
    rc = cli.main([str(path), "--target", "onnx-int8", "-o", str(tmp_path / "ht.onnx"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "QLinearConv (threshold)" in out, out[-3000:]
