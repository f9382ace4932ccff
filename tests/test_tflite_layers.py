"""Layers users write that the TFLite targets build: a crop written as tensor slicing (``y[:, :, 1:-1, 2:]``)
becomes a strided slice; a grouped (not depthwise) conv becomes one grouped CONV_2D, int8 in tflite-int8."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before anything imports TensorFlow: larq needs Keras 2
if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("larq_compute_engine") is None:
    pytest.skip("TFLite targets need the [tflite] extra", allow_module_level=True)

import htaf_export  # noqa: E402
from htaf_export import tflite_file as tfl  # noqa: E402
from htaf_export.nn import HTAF, BinaryConv2d  # noqa: E402

from conftest import save_pt2  # noqa: E402

SHAPE = (2, 9, 12)


class CroppedNet(nn.Module):
    """A user's net that crops its feature map between a float stem and a binary conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn, self.sign = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), HTAF(levels="pm1")
        self.body, self.body_bn, self.fire = BinaryConv2d(8, 6, 3), nn.BatchNorm2d(6), HTAF(levels="pm1")
        self.head = nn.Linear(6 * 5 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sign(self.stem_bn(self.stem(x)))[:, :, 1:-1, 2:]  # 9x12 → 7x10
        return self.head(self.fire(self.body_bn(self.body(h))).flatten(1))  # 3x3 conv: 5x8


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
@pytest.mark.parametrize("target", ["tflite", "tflite-float"])
def test_a_crop_exports_to_tflite_with_parity(tmp_path, fmt, target):
    torch.manual_seed(2)
    model, x = CroppedNet().eval(), torch.randn(2, *SHAPE)
    with torch.no_grad():
        for bn in (model.stem_bn, model.body_bn):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    path = tmp_path / f"cropped.{'pt2' if fmt == 'pt2' else 'ts.pt'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            save_pt2(model, x, path)
        else:
            model.body.freeze()  # a trace cannot record the binary layer's autograd function
            torch.jit.save(torch.jit.trace(model, x), str(path))
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, target, tmp_path / "m.tflite", input_shape=list(SHAPE), device="cpu")
    assert result.report.passed, result.report.failure_line()
    ops = tfl.op_names(tfl.read_model(result.artifact.read_bytes()))
    assert "STRIDED_SLICE" in ops, ops
    assert target != "tflite" or any("Lce" in op for op in ops), ops


class GroupedNet(nn.Module):
    """A grouped ±1 conv (2 groups of 4 channels) between {±1} steps, written with a straight-through sign."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.s1 = nn.Conv2d(1, 8, 3, padding=1), HTAF(levels="pm1")
        self.gc, self.gc_bn, self.s2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), \
            HTAF(levels="pm1")
        self.fc = nn.Linear(8 * 6 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gc.weight + (self.gc.weight.sign() - self.gc.weight).detach()
        h = self.s2(self.gc_bn(F.conv2d(self.s1(self.c1(x)), w, padding=1, groups=2)))
        return self.fc(h.flatten(1))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tflite", "tflite-float", "tflite-int8"])
def test_a_grouped_conv_exports_to_tflite_with_parity(tmp_path, target):
    torch.manual_seed(4)
    model = GroupedNet().eval()
    with torch.no_grad():
        model.gc_bn.running_mean.uniform_(-2, 2)
        model.gc_bn.running_var.uniform_(0.5, 2)
    path = tmp_path / "grouped.pt2"
    save_pt2(model, torch.randn(2, 1, 6, 7), path)
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, target, tmp_path / "g.tflite", device="cpu")
    assert result.report.passed, result.report.failure_line()
    row = next(r for r in result.conversion.rows if r.layer == "gc")
    assert "CONV_2D" in row.became and (target != "tflite-int8" or "int8" in row.became), row
