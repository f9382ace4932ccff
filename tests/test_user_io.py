"""What users hand the tool besides a plain model: a bool output, a forward that raises, a pickled torch.compile
wrapper, an exported file given as the model, an output folder. Each works or is refused in one line (exit 2)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import htaf_export
from htaf_export import cli

from conftest import save_pt2


class BoolOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.where(self.fc1(x) >= 0, 1.0, -1.0)) >= 0


class Lookup(nn.Module):
    """Its forward reads a key its table lacks: a KeyError, about the model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.table = nn.Linear(4, 4), {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fc(x) >= self.table["thr"]).float()


def _one_line_exit_2(args: list[str], capsys, *fragments: str) -> None:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    assert all(f in err for f in fragments), err


def test_a_bool_output_is_compared_exactly(tmp_path):
    torch.manual_seed(0)
    path = save_pt2(BoolOut().eval(), torch.randn(2, 16), tmp_path / "b.pt2")
    report = htaf_export.export(path, "onnx", tmp_path / "b.onnx", device="cpu").report
    assert report.passed and any(t.kind == "float" and t.elements > 0 for t in report.backends[0].tensors)


def test_whatever_forward_raises_is_exit_2_with_its_cause(tmp_path, capsys):
    path = tmp_path / "lookup.pt"
    torch.save(Lookup().eval(), path)
    _one_line_exit_2([str(path), "--target", "onnx", "--trust-pickle", "--input-shape", "4"], capsys,
                     "KeyError: 'thr'")


def test_a_pickled_torch_compile_wrapper_exports_its_model(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), htaf_export.nn.HTAF(), nn.Linear(8, 3)).eval()
    path = tmp_path / "compiled.pt"
    torch.save(torch.compile(model), path)
    result = htaf_export.export(path, "onnx", tmp_path / "c.onnx", input_shape=[6], trust_pickle=True, device="cpu")
    assert result.report.passed and len(result.hardening.sites) == 1


def test_an_exported_file_given_as_the_model_says_what_to_do(tmp_path, capsys):
    onnx_file = tmp_path / "user.onnx"
    onnx_file.write_bytes(b"\x08\x07not really onnx")
    _one_line_exit_2([str(onnx_file), "--target", "onnx"], capsys, "inspect user.onnx", "validate MODEL ARTIFACT")


def test_an_output_folder_that_does_not_exist_is_refused(tmp_path, capsys):
    model = tmp_path / "m.pt2"
    save_pt2(BoolOut().eval(), torch.randn(2, 16), model)
    _one_line_exit_2([str(model), "--target", "onnx", "-o", str(tmp_path / "nowhere.onnx") + "/"], capsys,
                     "does not exist")
    assert not (tmp_path / "nowhere.onnx").exists()


def test_a_wrong_output_suffix_is_said_before_the_model_is_read(tmp_path, capsys):
    _one_line_exit_2([str(tmp_path / "not_read_yet.pt"), "--target", "onnx", "-o", str(tmp_path / "m.tflite")],
                     capsys, "must end in .onnx")


class ScriptedLoop(nn.Module):
    """A GRU cell stepped over time in a scripted loop, from a zero state sized at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.GRUCell(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 16)
        for t in range(5):
            h = torch.where(self.cell(x[:, t], h) >= 0, 1.0, -1.0)
        return self.head(h)


def test_a_scripted_loop_the_exporter_cannot_follow_is_refused_with_what_to_do(tmp_path, capsys):
    path = tmp_path / "loop.pt"
    torch.jit.save(torch.jit.script(ScriptedLoop().eval()), str(path))
    _one_line_exit_2([str(path), "--target", "onnx", "--input-shape", "5,8", "-o", str(tmp_path / "l.onnx")], capsys,
                     "scripted code with loops or branches", "torch.jit.trace")
    assert not (tmp_path / "l.onnx").exists()
    traced = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(ScriptedLoop().eval(), torch.randn(2, 5, 8)), str(traced))
    assert htaf_export.export(traced, "onnx", tmp_path / "t.onnx", input_shape=[5, 8], device="cpu").report.passed


class ClassIndex(nn.Module):
    """Returns the predicted class (an argmax in forward), not logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.where(self.fc1(x) >= 0, 1.0, -1.0)).argmax(1)


def test_a_class_index_output_is_scored_against_the_labels(tmp_path):
    import numpy as np

    torch.manual_seed(3)
    model, x = ClassIndex().eval(), torch.randn(200, 12)
    with torch.no_grad():
        y = model(x).numpy().copy()
    y[::4] = (y[::4] + 1) % 5  # a quarter of the labels disagree with the model
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y)
    path = save_pt2(model, x[:2], tmp_path / "c.pt2")
    report = htaf_export.export(path, "onnx", tmp_path / "c.onnx", data=tmp_path / "d.npz", device="cpu").report
    backend = report.backends[0]
    assert report.passed and backend.labelled == 200, report.notes
    assert backend.reference_correct == backend.artifact_correct == 150


class SignOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sign(self.fc1(x)))


def test_a_model_whose_only_signs_are_torch_sign_is_told_why_no_step_is_checked(tmp_path):
    torch.manual_seed(0)
    path = save_pt2(SignOnly().eval(), torch.randn(2, 8), tmp_path / "s.pt2")
    result = htaf_export.export(path, "onnx", tmp_path / "s.onnx", device="cpu")
    assert result.report.passed and not any(t.kind == "binary" for t in result.report.backends[0].tensors)
    assert any("torch.sign is three-valued" in n for n in result.conversion.notes), result.conversion.notes


class DataBinarized(nn.Linear):
    """BinaryNet.pytorch's layer: binarizes its input and weight by assigning to ``.data`` in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.data = x.data.sign()
        if not hasattr(self.weight, "org"):
            self.weight.org = self.weight.data.clone()
        self.weight.data = self.weight.org.sign()
        return nn.functional.linear(x, self.weight)


def test_a_forward_that_assigns_to_data_is_refused_naming_the_layer(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Hardtanh(), DataBinarized(16, 4)).eval()
    model(torch.randn(2, 8))
    path = tmp_path / "binarynet.pt"
    torch.save(model, path)
    _one_line_exit_2([str(path), "--target", "onnx", "--trust-pickle", "--input-shape", "8"], capsys,
                     "layer '3'", "assigns to a tensor's .data", "torch.where(x >= 0")
    assert not (tmp_path / "binarynet.onnx").exists()


def test_a_map_output_on_the_digits_reports_no_accuracy(tmp_path):
    """An image-to-image model fed the bundled digits (its input is 64 values): argmax over a map is no class."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), htaf_export.nn.HTAF(levels="pm1"),
                          nn.Conv2d(4, 3, 3, padding=1)).eval()
    path = save_pt2(model, torch.randn(2, 1, 8, 8), tmp_path / "map.pt2")
    report = htaf_export.export(path, "onnx", tmp_path / "map.onnx", device="cpu").report
    assert report.passed and report.inputs.startswith("digits")
    assert any("not a vector of class scores" in n for n in report.notes), report.notes
    assert all(b.labelled == 0 for b in report.backends)


class DictIn(nn.Module):
    """A forward that takes a dict of tensors (``batch["image"]``), as data-loader-driven code writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc2(torch.where(self.fc1(batch["image"].flatten(1)) >= 0, 1.0, -1.0))


def test_a_pt2_whose_forward_takes_a_dict_exports_its_tensors_by_name(tmp_path):
    torch.manual_seed(0)
    program = torch.export.export(DictIn().eval(), ({"image": torch.randn(2, 1, 8, 8)},),
                                  dynamic_shapes=({"image": {0: torch.export.Dim("batch")}},))
    torch.export.save(program, tmp_path / "d.pt2")
    result = htaf_export.export(tmp_path / "d.pt2", "onnx", tmp_path / "d.onnx", device="cpu")
    assert result.report.passed and result.report.inputs.startswith("digits")
    assert [i.name for i in onnx.load(tmp_path / "d.onnx").graph.input] == ["input"]


def test_data_in_another_axis_order_is_refused_with_the_transpose_that_fixes_it(tmp_path, capsys):
    """Channels-last images for a [3, 7, 9] model held as many values per row, so they were read in the model's
    shape, every sample scrambled (and the parity check passed on the scrambled inputs)."""
    import numpy as np

    from htaf_export import cli

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 7, 2)).eval()
    path = htaf_export.save(model, tmp_path / "m.pt2", input_shape=[3, 7, 9])
    np.savez(tmp_path / "nhwc.npz", x=np.random.default_rng(0).random((16, 7, 9, 3), np.float32))
    np.savez(tmp_path / "flat.npz", x=np.random.default_rng(0).random((16, 3 * 7 * 9), np.float32))
    capsys.readouterr()
    code = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "nhwc.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "np.transpose(x, (0, 3, 1, 2))" in err and not (tmp_path / "m.onnx").exists(), err
    assert cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "m.onnx"), "--data",
                     str(tmp_path / "flat.npz")]) == 0  # flat rows of the right size are read as the input's shape


def test_a_float64_model_is_refused_with_the_cast_that_fixes_it(tmp_path, capsys):
    """It said 'does not run on inputs of shape [batch, 16]' and advised --input-shape, which the user gave."""
    model = BoolOut().eval().double()
    pickled, program = tmp_path / "double.pt", tmp_path / "double.pt2"
    torch.save(model, pickled)
    save_pt2(model, torch.randn(2, 16, dtype=torch.float64), program)
    for path, extra in ((pickled, ["--trust-pickle", "--input-shape", "16"]), (program, [])):
        _one_line_exit_2([str(path), "--target", "onnx", "-o", str(tmp_path / "d.onnx"), *extra], capsys,
                         "weights are float64 (fc1.weight", "model.float()")
        assert not (tmp_path / "d.onnx").exists()


def test_a_pt2_returning_a_namedtuple_is_refused_for_what_it_is(tmp_path):
    """torch writes it only with the class registered, and reads it back only where it is: was 'truncated or
    corrupt?' after 35 lines of torch's traceback. A fresh process, as the user's shell is."""
    import subprocess
    import sys

    script = f"""
import collections, torch
from torch.utils import _pytree
Pair = collections.namedtuple("Pair", ["scores", "code"])
_pytree._register_namedtuple(Pair, serialized_type_name="user_models.Pair")
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
    def forward(self, x):
        return Pair(self.fc(x), (self.fc(x) >= 0).float())
program = torch.export.export(Net().eval(), (torch.randn(2, 4),), dynamic_shapes=({{0: torch.export.Dim("batch")}},))
torch.export.save(program, {str(tmp_path / "pair.pt2")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "htaf_export.cli", str(tmp_path / "pair.pt2"), "--target", "onnx",
                           "-o", str(tmp_path / "pair.onnx")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "returns a namedtuple (user_models.Pair)" in done.stderr and "return a tuple or a dict" in done.stderr
    assert not (tmp_path / "pair.onnx").exists()


class OneAtATime(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2((self.fc1(x) >= 0).float().view(1, -1))


def test_a_pickle_that_runs_one_sample_at_a_time_is_told_where_the_batch_goes(tmp_path, capsys):
    """It was told to pass --input-shape, which it had."""
    path = tmp_path / "one.pt"
    torch.save(OneAtATime().eval(), path)
    _one_line_exit_2([str(path), "--target", "onnx", "--trust-pickle", "--input-shape", "6"], capsys,
                     "runs on one sample at a time only", "h.view(x.shape[0], -1)")


class ConceptsFirst(nn.Module):
    """A concept bottleneck that returns (concepts, logits): the concepts are steps, the logits the classes."""

    def __init__(self) -> None:
        super().__init__()
        self.to_concepts, self.head = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor):
        concepts = (self.to_concepts(x) >= 0).float()
        return concepts, self.head(concepts)


@pytest.mark.parametrize("workers", [1, 2])
def test_accuracy_is_scored_on_the_logits_not_on_concepts_returned_first(tmp_path, workers):
    """Output 0 (16 concept bits) was scored: labels 0..9 fit in 16 values, so 19.6 % was reported for a model
    at 96.4 %."""
    import numpy as np

    from htaf_export.data import digits

    torch.manual_seed(0)
    model = ConceptsFirst().eval()
    te = digits("test")
    x, y = te.x[:300].reshape(300, 64), te.y[:300]
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    path = save_pt2(model, torch.randn(2, 64), tmp_path / "c.pt2")
    result = htaf_export.export(path, "onnx", tmp_path / "c.onnx", device="cpu", data=data, workers=workers)
    with torch.no_grad():
        want = float((model(torch.from_numpy(x))[1].argmax(1).numpy() == y).mean())
    backend = result.report.to_dict()["backends"][0]
    assert backend["reference_accuracy"] == pytest.approx(want), (backend, want)
    assert any("scored on output 'output.1'" in n for n in result.report.notes), result.report.notes


def test_a_folder_or_an_empty_file_given_as_a_file_is_said_to_be_one(tmp_path, capsys):
    """A folder was 'does not exist'; an empty artifact 'was not written by htaf-export'."""
    import numpy as np

    path = save_pt2(BoolOut().eval(), torch.randn(2, 16), tmp_path / "b.pt2")
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "empty.onnx").write_bytes(b"")
    np.savez(tmp_path / "y_negative.npz", x=np.zeros((3, 16), np.float32), y=np.array([0, -1, 1]))
    _one_line_exit_2(["validate", str(path), str(folder)], capsys, "is a directory, not a file")
    _one_line_exit_2(["validate", str(path), str(tmp_path / "empty.onnx")], capsys, "is empty (0 bytes)")
    _one_line_exit_2([str(path), "--target", "onnx", "-o", str(tmp_path / "b.onnx"), "--data", str(folder)], capsys,
                     "is a directory, not an .npz file")
    _one_line_exit_2([str(path), "--target", "onnx", "-o", str(tmp_path / "b.onnx"), "--data",
                      str(tmp_path / "y_negative.npz")], capsys, "class indices from 0, but one is -1")
    assert not (tmp_path / "b.onnx").exists()
