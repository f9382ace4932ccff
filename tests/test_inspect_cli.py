"""`htaf-export inspect` through the command line: output for good models, one-line errors for bad input."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import htaf_export
from htaf_export import models
from htaf_export.cli import main
from htaf_export.data import digits, load_npz
from htaf_export.errors import BadInput
from htaf_export.inspect import layer_table, summarize

from conftest import SAMPLE_NAMES

CLI = Path(sys.executable).parent / "htaf-export"


@pytest.fixture
def wide(monkeypatch):
    """rich wraps tables to $COLUMNS (80 when not a terminal); give it room so cells stay on one line."""
    monkeypatch.setenv("COLUMNS", "200")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(code: int, err: str) -> str:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("htaf-export: error:")
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------- good input


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_inspect_sample_models(name, sample_paths, capsys, wide):
    ld = htaf_export.load(sample_paths[name])
    code, out, err = _run(capsys, "inspect", sample_paths[name])
    assert code == 0 and err == ""
    assert f"family={ld.family}" in out and f"arch={name}" in out
    assert f"input=[batch, {', '.join(map(str, ld.input_shape))}]" in out
    assert f"outputs={', '.join(ld.output_names)}" in out
    sites = htaf_export.harden(ld.module).sites
    for s in sites:
        assert s.name in out
    assert "Step sites" in out and "binary weights" in out
    layers = layer_table(ld.module)
    for layer in layers:
        assert layer.name in out
    total = sum(layer.params for layer in layers)
    assert f"{total:,}" in out
    if ld.family == "bnn":
        assert "yes (1 bit)" in out
        assert ("BinaryLinear" in out) and (("BinaryConv2d" in out) == (name == "bnn_cnn"))
        assert "pm1" in out
    else:
        assert "yes (1 bit)" not in out and "Binary" not in out
    assert "accuracy:" not in out  # only with --data


@pytest.mark.parametrize("name", ["icbm_cnn", "bnn_mlp"])
def test_inspect_default_width_keeps_names_whole(name, sample_paths, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    ld = htaf_export.load(sample_paths[name])
    code, out, _ = _run(capsys, "inspect", sample_paths[name])
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    for layer in layer_table(ld.module):
        assert layer.name in out and layer.kind in out
    for s in htaf_export.harden(ld.module).sites:
        assert s.name in out
    assert "input=[batch," in out


@pytest.mark.parametrize("name", ["dhn_mlp", "icbm_cnn", "bnn_cnn"])
def test_inspect_with_labelled_data_shows_gap_and_accuracy(name, sample_paths, npz_file, capsys, wide):
    ld = htaf_export.load(sample_paths[name])
    te = digits("test")
    path = npz_file(x=te.x[:200], y=te.y[:200])  # flat 64-vectors: reshaped to the model's input
    code, out, err = _run(capsys, "inspect", sample_paths[name], "--data", path)
    assert code == 0 and err == ""
    ds = load_npz(path, ld.input_shape)
    result = htaf_export.harden(ld.module, torch.from_numpy(ds.x), torch.from_numpy(ds.y))
    assert "unsaturated" in out
    for g in result.gaps:
        row = next(line for line in out.splitlines() if g.name in line)
        assert f"{g.fraction:.2%} of {g.count:,}" in row
    assert (f"accuracy: as trained {result.smooth_accuracy:.2%}, hardened {result.hardened_accuracy:.2%}") in out


def test_inspect_with_data_reads_a_pt2_and_a_model_of_two_inputs(load_sample, tmp_path, npz_file, capsys, wide):
    """Both crashed (exit 3): a graph module refuses eval(); the inputs of a two-input model are a tuple."""
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.act = torch.nn.Linear(64, 16), torch.nn.Linear(4, 16), htaf_export.nn.HTAF()
            self.head = torch.nn.Linear(16, 10)

        def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.a(image) + self.b(extra)))

    torch.manual_seed(0)
    te = digits("test")
    one = htaf_export.save(load_sample("dhn_mlp").module, tmp_path / "one.pt2", format="pt2")
    two = tmp_path / "two.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(TwoInputs().eval(), (torch.randn(2, 64), torch.randn(2, 4)),
                                          dynamic_shapes=({0: batch}, {0: batch})), two)
    single = npz_file(x=te.x[:100], y=te.y[:100])
    both = tmp_path / "both.npz"
    np.savez(both, image=te.x[:100], extra=np.ones((100, 4), np.float32), y=te.y[:100])
    for model, data in ((one, single), (two, both)):
        code, out, err = _run(capsys, "inspect", model, "--data", data)
        assert code == 0 and "accuracy: as trained" in out, err
    head = next(line for line in out.splitlines() if line.startswith("│ head "))
    assert "Linear" in head, head  # the class the program recorded (was "Module" for every layer of a .pt2)


def test_inspect_with_unlabelled_data_shows_gap_only(sample_paths, npz_file, capsys, wide):
    te = digits("test")
    path = npz_file(inputs=te.x[:50])  # the only array, under another key
    code, out, err = _run(capsys, "inspect", sample_paths["dhn_mlp"], "--data", path)
    assert code == 0 and err == ""
    assert "unsaturated" in out and "of 12,800" in out  # 50 samples x 256 units at layers.act1
    assert "accuracy:" not in out


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_inspect_traced_formats(fmt, load_sample, tmp_path, capsys, wide):
    hard = htaf_export.harden(load_sample("bnn_mlp").module).model
    path = htaf_export.save(hard, tmp_path / f"m.{fmt}", format=fmt)
    code, out, _ = _run(capsys, "inspect", path)
    assert code == 0
    assert "layers.act1" in out and "layers.act2" in out
    # its binary layers found again in the traced graph, as the ONNX export packs them
    binary = [layer.name for layer in layer_table(load_sample("bnn_mlp").module) if layer.binary]
    assert binary and all("yes (1 bit)" in next(line for line in out.splitlines() if line.startswith(f"│ {name} "))
                          for name in binary), out
    assert "note: binary layers found as the ONNX export finds them" in out


def test_inspect_trusted_pickle(load_sample, tmp_path, capsys, wide):
    path = tmp_path / "pickled.pt"
    torch.save(load_sample("dhn_mlp").module, path)
    code, _, err = _run(capsys, "inspect", path)
    assert "--trust-pickle" in _one_error_line(code, err)
    code, out, err = _run(capsys, "inspect", path, "--trust-pickle")
    assert code == 0 and "format=pickle" in out and "layers.act2" in out


def test_summarize_counts_bits():
    torch.manual_seed(0)
    m = models.build("bnn_mlp", dict(in_features=8, hidden=[4], classes=2))
    ld = htaf_export.LoadedModel(m, [8], "checkpoint", Path("x.pt"), "0", "bnn", "bnn_mlp")
    s = summarize(ld)
    by_name = {layer.name: layer for layer in s.layers}
    assert by_name["layers.fc1"].binary and by_name["layers.fc1"].bits == 32  # 4x8 weights, one bit each
    assert by_name["layers.bn1"].bits == 4 * 4 * 32  # weight, bias, running mean and var, float32
    assert s.params == sum(layer.params for layer in s.layers)
    assert s.hardening is None


# ---------------------------------------------------------------------------------------- bad input


def _garbage(path: Path) -> Path:
    rng = random.Random(1)
    path.write_bytes(bytes(rng.randrange(256) for _ in range(3000)))
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "directory", "truncated", "unknown_arch",
                                  "state_dict", "pickle"])
def test_inspect_bad_model(case, sample_paths, tmp_path, capsys):
    path = tmp_path / "model.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        _garbage(path)
    elif case == "directory":
        path = tmp_path
    elif case == "truncated":
        data = sample_paths["snn_mlp"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "unknown_arch":
        obj = torch.load(sample_paths["dhn_mlp"], weights_only=True)
        obj["arch"] = "mystery_net"
        torch.save(obj, path)
    elif case == "state_dict":
        torch.save(models.build("dhn_mlp").state_dict(), path)
    elif case == "pickle":
        torch.save(models.build("dhn_mlp"), path)
    code, out, err = _run(capsys, "inspect", path)
    line = _one_error_line(code, err)
    assert out == ""
    expected = {"missing": "does not exist", "empty": "empty", "directory": "directory",
                "truncated": "corrupt", "unknown_arch": "mystery_net", "state_dict": "not a model: save the model itself",
                "pickle": "--trust-pickle"}
    if case in expected:
        assert expected[case] in line


def _bad_npz(case: str, tmp_path: Path) -> Path:
    te = digits("test")
    path = tmp_path / "data.npz"
    if case == "wrong_shape":
        np.savez(path, x=np.zeros((5, 7), np.float32))
    elif case == "no_x_key":
        np.savez(path, inputs=te.x[:5], labels=te.y[:5])
    elif case == "nan":
        x = te.x[:5].copy()
        x[2, 3] = np.nan
        np.savez(path, x=x, y=te.y[:5])
    elif case == "inf":
        x = te.x[:5].copy()
        x[0, 0] = np.inf
        np.savez(path, x=x)
    elif case == "not_npz":
        path.write_text("x,y\n1,2\n")
    elif case == "npy":
        path = tmp_path / "data.npy"
        np.save(path, te.x[:5])
    elif case == "garbage":
        _garbage(path)
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "missing":
        path = tmp_path / "nope.npz"
    elif case == "bad_labels":
        np.savez(path, x=te.x[:5], y=te.y[:4])
    elif case == "float_labels":  # whole-valued float labels are read as integers; halves are no class
        np.savez(path, x=te.x[:5], y=te.y[:5].astype(np.float32) + 0.5)
    elif case == "negative_labels":  # was accepted, and every -1 scored as a miss
        np.savez(path, x=te.x[:5], y=np.array([0, 1, -1, 2, 3]))
    elif case == "no_samples":
        np.savez(path, x=np.zeros((0, 64), np.float32))
    elif case == "strings":
        np.savez(path, x=np.array(["a", "b"]))
    return path


NPZ_CASES = {
    "wrong_shape": "do not fit", "no_x_key": "under key 'x'", "nan": "NaN", "inf": "infinity",
    "not_npz": "not a readable .npz", "npy": "not a readable .npz", "garbage": "not a readable .npz",
    "empty_file": "not a readable .npz", "missing": "does not exist", "bad_labels": "labels",
    "float_labels": "labels", "no_samples": "no samples", "strings": "dtype",
    "negative_labels": "class indices from 0, but one is -1",
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_inspect_bad_data(case, sample_paths, tmp_path, capsys):
    path = _bad_npz(case, tmp_path)
    code, _, err = _run(capsys, "inspect", sample_paths["dhn_mlp"], "--data", path)
    line = _one_error_line(code, err)
    assert NPZ_CASES[case] in line
    with pytest.raises(BadInput):
        load_npz(path, [64])


@pytest.mark.parametrize("argv", [
    ["inspect", "--bogus", "MODEL"],
    ["inspect"],
    ["inspect", "MODEL", "extra"],
    ["MODEL", "--target", "onnx", "--bogus"],
    ["MODEL", "--target", "pdf"],
    [],
])
def test_bad_usage(argv, sample_paths, capsys):
    argv = [str(sample_paths["dhn_mlp"]) if a == "MODEL" else a for a in argv]
    code, out, err = _run(capsys, *argv)
    line = _one_error_line(code, err)
    assert "--help" in line
    assert out == ""


def test_subprocess_bad_input_exit_code_and_one_line(tmp_path):
    bad = _garbage(tmp_path / "bad.pt")
    proc = subprocess.run([str(CLI), "inspect", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("htaf-export: error:") and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---------------------------------------------------------------------------------------- exported files


def test_inspect_an_exported_file_shows_its_metadata(sample_paths, tmp_path, capsys, wide):
    artifact = tmp_path / "cnn.int8.onnx"
    htaf_export.export(sample_paths["bnn_cnn"], "onnx-int8", artifact, validate_artifact=False)
    capsys.readouterr()
    code, out, err = _run(capsys, "inspect", artifact)
    assert code == 0 and err == "", err
    for expected in ("onnx-int8", "bnn_cnn", "Sign (ge)", "weights at 1 bit each", "htaf-export validate MODEL"):
        assert expected in out, out


@pytest.mark.parametrize("case", ["garbage", "foreign"])
def test_inspect_a_bad_exported_file_is_one_line(case, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    if case == "garbage":
        _garbage(path)
    else:  # a valid ONNX file another tool wrote
        import onnx
        from onnx import helper

        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        onnx.save(helper.make_model(graph), path)
    code, out, err = _run(capsys, "inspect", path)
    line = _one_error_line(code, err)
    assert out == "" and str(path.name) in line


def test_a_report_without_validation_is_refused_before_anything_is_written(sample_paths, tmp_path, capsys):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    code, printed, err = _run(capsys, sample_paths["dhn_mlp"], "--target", "onnx", "-o", out, "--no-validate",
                              "--report", report)
    assert "--no-validate" in _one_error_line(code, err) and printed == ""
    assert not out.exists() and not report.exists()


def test_inspect_lists_the_plain_steps_of_a_torchscript_trace(tmp_path, capsys, wide):
    """A trace's `(conv(x) > t).float()` steps are found by capture, not by hardening: inspect listed no site."""

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv1d(5, 8, 3), torch.nn.Conv1d(8, 8, 3, dilation=2)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = (self.c2((self.c1(x) > 0).float()) > 0.1).float()
            return self.fc(h.amax(-1))

    torch.manual_seed(0)
    path = tmp_path / "k.pt"
    torch.jit.save(torch.jit.trace(Plain().eval(), torch.randn(2, 5, 31)), path)
    code, out, _ = _run(capsys, "inspect", str(path), "--input-shape", "5,31")
    rows = [line for line in out.splitlines() if "exact step in the captured graph" in line]
    assert code == 0 and len(rows) == 2 and " 0.1 " in rows[1], out
