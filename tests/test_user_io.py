"""What users hand the tool besides a plain model: a bool output, a forward that raises, a pickled torch.compile
wrapper, an exported file given as the model, an output folder. Each works or is refused in one line (exit 2)."""

from __future__ import annotations

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
