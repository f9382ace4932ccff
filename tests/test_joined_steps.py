"""Step activations joined and cut before a binary conv, as binary U-Nets and BinaryDenseNet write them: a skip
connection concatenated with an upsampled path (``torch.cat``), and a channel slice (``h[:, 2:6]``). Both hold
only ±1 values, so the convs reading them stay binary on every target (they were float, "input is real-valued")."""

from __future__ import annotations

import contextlib
import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import htaf_export

from conftest import save_as_user, with_trained_norms


class SignConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + (self.weight.sign() - self.weight).detach()
        return self._conv_forward(x, w, self.bias)


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.down, self.bn1 = SignConv(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fuse, self.bn2 = SignConv(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.cut, self.bn3 = SignConv(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _sign(self.bn0(self.stem(x)))
        up = F.interpolate(_sign(self.bn1(self.down(a))), scale_factor=2, mode="nearest")
        c = _sign(self.bn2(self.fuse(torch.cat([a, up], 1))))
        return self.head(_sign(self.bn3(self.cut(c[:, 2:6]))).mean((2, 3)))


NEEDS = {"tflite": "larq_compute_engine", "tflite-int8": "tensorflow", "onnx-int8": "onnxruntime", "qonnx": "qonnx"}


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "target", "binary"), [
    ("pt2", "tflite", "LceBconv2d"), ("torchscript", "onnx-int8", "QLinearConv"),
    ("pt2", "tflite-int8", "int8 CONV_2D"), ("pt2", "qonnx", "BipolarQuant")])
def test_joined_and_sliced_steps_feed_binary_convs(fmt, target, binary, tmp_path):
    if importlib.util.find_spec(NEEDS[target]) is None:
        pytest.skip(f"{target} needs {NEEDS[target]}")
    torch.manual_seed(0)
    model = with_trained_norms(SkipNet())
    path = save_as_user(model, torch.randn(2, 2, 12, 12), tmp_path / ("m.pt2" if fmt == "pt2" else "m.ts"), fmt)
    suffix = ".onnx" if "onnx" in target else ".tflite"
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, target, tmp_path / f"m{suffix}", input_shape=[2, 12, 12], device="cpu")
    assert result.report.passed, result.report.failure_line()
    became = {r.layer: r.became for r in result.conversion.rows}
    assert binary in became["fuse"] and binary in became["cut"], became
