"""A long TFLite validation moves the interpreters to a child process that runs them while this one computes the
references (htaf_export/overlap.py): the report is the same as in one process, and a wrong artifact still fails
at the same tensor."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

from htaf_export import cli, overlap


from shard_reports import counts, validate_cli

# not imported here: TensorFlow must be imported by the project, which chooses its Keras
if importlib.util.find_spec("larq_compute_engine") is None:
    pytest.skip("needs the tflite extra", allow_module_level=True)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _started(monkeypatch) -> list:
    """Force the child after the first batch (the samples are too small to be worth one), wait until it is ready,
    and record it."""
    made = []
    real = overlap.RunnerProcess

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        while made[-1].state == "starting" and not made[-1].ready():  # ready before the few batches run out
            time.sleep(0.05)
        return made[-1]

    monkeypatch.setattr(overlap, "WORTH_STARTING_S", 0.0)
    monkeypatch.setattr(overlap, "RunnerProcess", spy)
    return made


def test_step_values_cross_as_int8_only_when_that_is_exact():
    exact = np.array([0.0, 1.0, -1.0], np.float32)
    wrong = np.array([0.0, 0.7, 300.0, np.nan], np.float32)  # what a broken artifact may write
    assert overlap._small(exact).dtype == np.int8 and np.array_equal(overlap._small(exact), exact)
    assert overlap._small(wrong) is wrong


@pytest.mark.slow
def test_the_child_gives_the_same_report_as_one_process(tmp_path, capsys, monkeypatch):
    model = SAMPLES / "bnn_cnn.pt"
    artifact = tmp_path / "bnn_cnn.tflite"
    assert cli.main([str(model), "--target", "tflite", "-o", str(artifact), "--no-validate"]) == 0
    rc1, alone = validate_cli(capsys, model, artifact, tmp_path / "alone.json")
    made = _started(monkeypatch)
    calls = []
    monkeypatch.setattr(overlap, "_overlapped", lambda *a, real=overlap._overlapped: (calls.append(1), real(*a)))
    rc2, child = validate_cli(capsys, model, artifact, tmp_path / "child.json")
    assert made and calls, "the child process was started and took batches"
    assert rc1 == rc2 == 0 and counts(alone) == counts(child)


@pytest.mark.slow
def test_a_wrong_artifact_fails_at_the_same_tensor_with_the_child(tmp_path, capsys, monkeypatch):
    import torch

    import htaf_export

    artifact = tmp_path / "dhn.float.tflite"
    assert cli.main([str(SAMPLES / "dhn_mlp.pt"), "--target", "tflite-float", "-o", str(artifact),
                     "--no-validate"]) == 0
    model = htaf_export.load(SAMPLES / "dhn_mlp.pt").module
    with torch.no_grad():
        model.layers.bn1.running_mean += 0.5  # not the model the file was exported from
    nudged = tmp_path / "nudged.pt"
    htaf_export.save(model, nudged)
    rc1, alone = validate_cli(capsys, nudged, artifact, tmp_path / "a.json")
    made = _started(monkeypatch)
    rc2, child = validate_cli(capsys, nudged, artifact, tmp_path / "b.json")
    assert made and made[0].state == "ready", "the child ran the interpreter"
    assert rc1 == rc2 == 1 and counts(alone) == counts(child)
    assert alone["first_failure"]["tensor"] == "layers.act1"
