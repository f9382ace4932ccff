"""TFLite Micro's interpreter validates the builtin-op TFLite files (tflite-float, tflite-int8): the file a
microcontroller runs, checked tensor by tensor; a wrong file fails on it too."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tflite_micro") is None:
    pytest.skip("needs the [tflite] and [micro] extras", allow_module_level=True)

import htaf_export  # noqa: E402
from htaf_export import tflite_file as tfl  # noqa: E402

from conftest import SAMPLE_DIR, digits_subset  # noqa: E402


def _export(name: str, target: str, out):
    with contextlib.redirect_stdout(io.StringIO()):
        return htaf_export.export(SAMPLE_DIR / f"{name}.pt", target, out,
                                  data=digits_subset(SAMPLE_DIR / f"{name}.pt", out.parent))


@pytest.mark.parametrize(("name", "target"), [("bnn_cnn", "tflite-int8"), ("dhn_mlp", "tflite-float")])
def test_builtin_files_pass_on_tflite_micro_with_every_step_observed(tmp_path, name, target):
    result = _export(name, target, tmp_path / "m.tflite")
    assert result.report.passed, result.report.failure_line()
    micro = next(b for b in result.report.backends if b.backend == "tflite-micro")
    steps = [t for t in micro.tensors if t.kind == "binary"]
    assert micro.passed and steps and all(t.elements > 0 for t in steps)


def test_a_wrong_int8_weight_fails_on_tflite_micro(tmp_path):
    good = _export("bnn_cnn", "tflite-int8", tmp_path / "good.tflite").artifact
    model = tfl.read_model(good.read_bytes())
    graph = model.subgraphs[0]
    conv = next(o for o, n in zip(graph.operators, tfl.op_names(model)) if n == "CONV_2D"
                and graph.tensors[int(o.inputs[1])].type == 9)  # the int8 binary conv
    buffer = model.buffers[graph.tensors[int(conv.inputs[1])].buffer]
    weights = np.array(buffer.data, dtype=np.uint8).view(np.int8)
    weights[:16] *= -1  # 16 weights of the first filter change sign
    buffer.data = weights.view(np.uint8)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(tfl.write_model(model))
    with contextlib.redirect_stdout(io.StringIO()):
        digits = digits_subset(SAMPLE_DIR / "bnn_cnn.pt", tmp_path)
        report = htaf_export.validate(SAMPLE_DIR / "bnn_cnn.pt", bad, data=digits)
    micro = next(b for b in report.backends if b.backend == "tflite-micro")
    assert not report.passed and not micro.passed


def test_a_file_no_microcontroller_holds_is_not_run_there_and_the_report_says_why(tmp_path, monkeypatch):
    from htaf_export.runtimes import tflite_micro

    monkeypatch.setattr(tflite_micro, "LARGEST", 1000)  # bytes: every sample file is larger
    report = _export("bnn_cnn", "tflite-int8", tmp_path / "m.tflite").report
    assert report.passed and "tflite-micro" not in [b.backend for b in report.backends]
    assert any(s["backend"] == "tflite-micro" and "larger than a microcontroller holds" in s["reason"]
               for s in report.skipped), report.skipped
