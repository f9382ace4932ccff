"""Outputs users return that the TFLite targets once refused: ``logits.argmax(1)`` beside the logits (ARG_MAX,
int64 as PyTorch returns it; TFLite Micro has ARG_MAX, but not to int64: it is reported as not run, not a
crash); decisions between two computed tensors (``s[:, 0] > s[:, 1]``, ``&``, a ``where`` on them) and ``flip``."""

from __future__ import annotations

import contextlib
import importlib.util
import io

import pytest
import torch
from torch import nn

import htaf_export

from conftest import save_pt2

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs the [tflite] extra")


class Labelled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.bn, self.head = nn.Linear(20, 10), nn.BatchNorm1d(10), nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head((self.bn(self.enc(x)) > 0).float())
        return {"logits": logits, "label": logits.argmax(dim=1)}


@pytest.mark.slow
def test_an_argmax_output_converts_and_matches(tmp_path):
    torch.manual_seed(0)
    path = save_pt2(Labelled().eval(), torch.randn(2, 20), tmp_path / "l.pt2")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite-float", tmp_path / "l.tflite", device="cpu")
    assert result.report.passed, result.report.failure_line()
    compared = {t.name for b in result.report.backends for t in b.tensors}
    assert "label" in compared, compared
    if importlib.util.find_spec("tflite_micro") is not None:
        assert any("cannot run ARG_MAX" in s["reason"] for s in result.report.skipped), result.report.skipped


@pytest.mark.slow
def test_decisions_between_computed_tensors_and_a_flip_convert_and_match(tmp_path):
    """One head row is another reversed and fed the flipped features, so two scores are equal in exact arithmetic:
    their comparison may go either way in a correct file, and must not fail it (its bound says so)."""
    from test_bounds import _Decides

    torch.manual_seed(3)
    path = save_pt2(_Decides().eval(), torch.randn(2, 6), tmp_path / "d.pt2")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite-float", tmp_path / "d.tflite", device="cpu")
    assert result.report.passed and result.report.tolerance.derived, result.report.failure_line()
    compared = {t.name for b in result.report.backends for t in b.tensors}
    assert len(compared) >= 3, compared
