"""User-style models (tests/gallery/models.py), each saved in the four formats a user saves with and exported
to every target, validated on the real runtimes.

The models are plain PyTorch: their own module names, HTAF sites with different shapes, thresholds and tie
rules, hand-written binary layers, a Bi-Real-Net block, a spiking loop, dict / nested outputs, zero padding
and concatenation, two inputs, a step written as an autograd.Function. None sets ``input_shape``: the shape
comes from the data file given to the export, as a user's would.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import htaf_export
from htaf_export import models as registry
from htaf_export.errors import BadInput, UnsupportedLayer
from htaf_export.targets import TARGETS

from gallery import models as G

FORMATS = ("checkpoint", "torchscript", "pt2", "pickle")
TRAIN_STEPS = 40
# layers whose weights are binarized inline: packed in ONNX; and how many LCE bit-packs (real inputs,
# and zero padding at stride 2, stay float, as the summary says)
BINARY = {"binary_cnn_handwritten": (2, 2), "binary_where_weights": (2, 1), "bireal_style": (2, 1)}
# an autograd.Function in forward cannot be traced by TorchScript (a user cannot write that file)
NO_TORCHSCRIPT = {"custom_step_fn"}

# NIR carries 0/1 neurons (LIF with a zero reset, Threshold) and the layers between them; the other models are
# refused in one line, for the reason given (tests/test_nir.py covers the target itself)
NIR_EXPORTS = {"mlp_two_ties", "custom_step_fn", "conv_snn_zero_reset"}
NIR_REFUSALS = {"snn_plain_loop": "subtract reset", "icbm_dict": "no NIR node"}

for _name, (_cls, _) in G.REGISTRY.items():
    if f"gallery.{_name}" not in registry.architectures():
        registry.register(f"gallery.{_name}")(_cls)


def _data_file(name: str, directory: Path) -> Path:
    """The digits test split shaped for the model, one array per input (x, or x0 and x1), labels y."""
    xs, y = G.digits_inputs(G.REGISTRY[name][1], "test")
    arrays = {"x": xs[0]} if len(xs) == 1 else {f"x{k}": a for k, a in enumerate(xs)}
    path = directory / "data.npz"
    np.savez(path, y=y, **arrays)
    return path


def _save(model: torch.nn.Module, fmt: str, name: str, directory: Path) -> Path:
    shapes = [list(s) for s in G.REGISTRY[name][1]]
    example = tuple(torch.zeros(2, *s) for s in shapes)
    path = directory / f"{name}.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "checkpoint":
            htaf_export.save(model, path, input_shape=shapes if len(shapes) > 1 else shapes[0])
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, example if len(example) > 1 else example[0], strict=False), str(path))
        elif fmt == "pt2":
            dims = tuple({0: torch.export.Dim("batch")} for _ in example)
            torch.export.save(torch.export.export(model, example, dynamic_shapes=dims), path)
        else:
            torch.save(model, path)
    return path


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(model, format) → (saved file, data file), for every cell a user can write."""
    files = {}
    for name in G.REGISTRY:
        directory = tmp_path_factory.mktemp(name)
        model = G.build(name, steps=TRAIN_STEPS)
        data = _data_file(name, directory)
        for fmt in FORMATS:
            if fmt == "torchscript" and name in NO_TORCHSCRIPT:
                continue
            files[(name, fmt)] = (_save(model, fmt, name, directory), data)
    return files


def test_every_model_saves_in_every_format_a_user_can_write(gallery):
    cells = {(name, fmt) for name in G.REGISTRY for fmt in FORMATS}
    assert set(gallery) == cells - {(name, "torchscript") for name in NO_TORCHSCRIPT}


def covered(name: str, fmt: str, target: str) -> bool:
    """The cells ``make test`` runs (``make test-all``, or HTAF_FULL_MATRIX=1, runs all 308): every model in every
    format to onnx, and every model to every other target from one format, which turns with the model and the
    target, so that each (format, target) pair is met by two or three models; CI stays within its time."""
    if os.environ.get("HTAF_FULL_MATRIX") or target == "onnx":
        return True
    return FORMATS[(list(G.REGISTRY).index(name) + list(TARGETS).index(target)) % len(FORMATS)] == fmt


CELLS = [(n, f, t) for n in G.REGISTRY for f in FORMATS for t in TARGETS if covered(n, f, t)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fmt", "target"), CELLS)
def test_gallery_exports_with_parity(gallery, name, fmt, target, tmp_path):
    if (name, fmt) not in gallery:
        pytest.skip("TorchScript cannot trace an autograd.Function in forward")
    source, data = gallery[(name, fmt)]
    out = tmp_path / f"m{TARGETS[target].default_suffix}"
    if target == "nir" and name not in NIR_EXPORTS:
        with pytest.raises(UnsupportedLayer) as refused:
            htaf_export.export(source, target, out, data=data, trust_pickle=True, device="cpu")
        assert "\n" not in str(refused.value) and not out.exists()
        if fmt != "torchscript":  # a traced file names its layers by op: its reasons vary with the first one met
            assert NIR_REFUSALS.get(name, "±1 sign") in str(refused.value)
        return
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(source, target, out, data=data, trust_pickle=True, device="cpu")
    report = result.report
    assert report is not None and report.passed, report.failure_line()
    backend = report.backends[0]
    assert backend.samples == 450 and backend.labelled == 450
    steps = [t for t in backend.tensors if t.kind == "binary"]
    assert steps and all(t.elements > 0 for t in steps), [t.name for t in steps if not t.elements]
    if fmt == "torchscript":  # no module tree to hook: its steps come from its captured graph
        assert any("captured graph run in ONNX Runtime" in n for n in report.notes)
    outputs = [t.name for t in backend.tensors if t.kind == "float"]
    assert outputs, "every float output is compared"
    packed, bitpacked = BINARY.get(name, (0, 0))
    rows = result.conversion.rows
    if target == "onnx":
        assert sum(r.became == "packed 1-bit weights" for r in rows) == packed, rows
    if target == "tflite":
        assert sum(r.became == "LceBconv2d (bit-packed)" for r in rows) == bitpacked, rows


def test_dict_and_nested_outputs_are_named_after_keys_and_positions(gallery, tmp_path):
    names = {}
    for name in ("icbm_dict", "nested_outputs"):
        source, data = gallery[(name, "pt2")]
        with contextlib.redirect_stdout(io.StringIO()):
            result = htaf_export.export(source, "onnx", tmp_path / f"{name}.onnx", data=data, device="cpu")
        names[name] = [o.name for o in onnx.load(str(result.artifact)).graph.output]
    assert names["icbm_dict"] == ["logits", "concepts"]
    assert names["nested_outputs"] == ["output.0", "output.1.0", "output.1.1"]


def test_each_site_keeps_its_declared_tie_rule(gallery, tmp_path):
    """mlp_two_ties declares ge and gt at its two sites; the pickle keeps the modules, so both rules survive."""
    source, data = gallery[("mlp_two_ties", "pickle")]
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(source, "onnx", tmp_path / "m.onnx", data=data, trust_pickle=True, device="cpu")
    assert {s.name: s.tie for s in result.hardening.sites} == {"gate_wide": "ge", "gate_narrow": "gt"}
    with pytest.raises(BadInput, match="conflicts with the tie rule the model declares at gate_wide"):
        htaf_export.export(source, "onnx", tmp_path / "n.onnx", data=data, trust_pickle=True, tie="gt")


def _cli(*args: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "htaf_export.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


MAIN_SCRIPT = """
import torch
from torch import nn
from htaf_export.nn import HTAF

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 3), HTAF()
    def forward(self, x):
        return self.act(self.fc(x))

torch.save(Net(), "{path}")
"""


def test_pickled_class_from_a_training_script_fails_honestly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(MAIN_SCRIPT.format(path=tmp_path / "main.pt"))
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, timeout=120)
    done = _cli(str(tmp_path / "main.pt"), "--target", "onnx", "--trust-pickle", "--input-shape", "4", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "'Net'" in done.stderr and "__main__" in done.stderr and "corrupt" not in done.stderr
    assert "htaf_export.save" in done.stderr and ".pt2" in done.stderr


def test_pickled_class_is_found_in_the_current_directory(tmp_path):
    (tmp_path / "mynet.py").write_text(MAIN_SCRIPT.split("torch.save")[0])
    subprocess.run([sys.executable, "-c", "import torch, mynet; torch.save(mynet.Net(), 'net.pt')"], cwd=tmp_path,
                   check=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    missing = _cli("net.pt", "--target", "onnx", "--trust-pickle", cwd=tmp_path)
    assert missing.returncode == 2 and "--input-shape" in missing.stderr and "--data" in missing.stderr
    done = _cli("net.pt", "--target", "onnx", "--trust-pickle", "--input-shape", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    gone = _cli(str(tmp_path / "net.pt"), "--target", "onnx", "--trust-pickle", "--input-shape", "4", cwd=elsewhere)
    assert gone.returncode == 2 and "module 'mynet'" in gone.stderr and "PYTHONPATH" in gone.stderr


def test_two_inputs_from_the_command_line(gallery, tmp_path):
    source, data = gallery[("two_inputs", "pickle")]
    done = _cli(str(source), "--target", "onnx", "-o", str(tmp_path / "m.onnx"), "--trust-pickle", "--data", str(data),
                "--device", "cpu", cwd=tmp_path, pythonpath=str(Path(__file__).parent))
    assert done.returncode == 0, done.stderr + done.stdout
    inputs = [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input]
    assert inputs == ["image", "extra"]
    shapes = _cli(str(source), "--target", "onnx", "-o", str(tmp_path / "n.onnx"), "--trust-pickle",
                  "--input-shape", "1,8,8", cwd=tmp_path, pythonpath=str(Path(__file__).parent))
    assert shapes.returncode == 2 and "takes 2 inputs (image, extra)" in shapes.stderr


def test_the_covered_cells_meet_every_format_with_every_target():
    pairs = {(f, t): sum(1 for n, g, u in CELLS if (g, u) == (f, t)) for f in FORMATS for t in TARGETS}
    assert min(pairs.values()) >= 2, pairs
    assert {n for n, _, _ in CELLS} == set(G.REGISTRY)
