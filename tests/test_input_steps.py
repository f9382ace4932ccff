"""A binary network whose first step reads its raw input (``sign(x)``): the crafted threshold inputs put that
input beside 0, and a subnormal there is 0 to LCE's quantizer (it flushes them), +1 where PyTorch gives −1.
Crafted inputs are kept normal, so the bit-packed file passes; it failed on flips blamed on the next layer."""

from __future__ import annotations

import contextlib
import importlib.util
import io

import numpy as np
import pytest
import torch
from torch import nn

import htaf_export
from htaf_export.crafted import _normal

from conftest import save_pt2


class RawSign(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1, self.fc2 = nn.Linear(30, 32), nn.BatchNorm1d(32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + (torch.where(x >= 0, 1.0, -1.0) - x).detach()
        w = self.fc1.weight
        w = w + (torch.where(w >= 0, 1.0, -1.0) - w).detach()
        h = self.bn1(nn.functional.linear(h, w, self.fc1.bias))
        h = h + (torch.where(h >= 0, 1.0, -1.0) - h).detach()
        return torch.sigmoid(self.fc2(h)).squeeze(-1)


def test_crafted_inputs_are_never_subnormal():
    tiny = np.finfo(np.float32).tiny
    assert _normal(np.float32(-1e-45)) == -tiny and _normal(np.float32(1e-40)) == tiny
    assert _normal(np.float32(0.0)) == 0.0 and _normal(np.float32(-2e-38)) == np.float32(-2e-38)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("larq_compute_engine") is None, reason="needs the [tflite] extra")
def test_a_step_on_the_raw_input_validates_on_the_bit_packed_file(tmp_path):
    torch.manual_seed(0)
    model = RawSign()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-2, 2)
        model.bn1.running_var.uniform_(0.5, 2)
    path = save_pt2(model.eval(), torch.randn(2, 30), tmp_path / "raw.pt2")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite", tmp_path / "raw.tflite", device="cpu")
    assert result.report.passed, result.report.failure_line()
    assert result.report.crafted["exact_ties"] > 0, result.report.crafted  # inputs put on the input step's threshold
