"""``--sign-as-step``: ``torch.sign`` of a computed tensor read as a ±1 step (sign(0) = +1 with the ge rule, as
larq and LCE do), so the convs it feeds are binary. ReActNet's approximate sign (``sign(x).detach() − y.detach()
+ y``) and Bi-Real's straight-through form (``x + (sign(x) − x).detach()``) are the step itself in eval."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import htaf_export
from htaf_export import cli

from conftest import save_pt2, with_trained_norms


class ApproxSign(nn.Module):
    """ReActNet's binary activation: the sign forward, a piecewise quadratic backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        below, negative, above = (x < -1).float(), (x < 0).float(), (x < 1).float()
        out = -1 * below + (x * x + 2 * x) * (1 - below)
        out = out * negative + (-x * x + 2 * x) * (1 - negative)
        out = out * above + 1 - above
        return torch.sign(x).detach() - out.detach() + out


class ScaledSignConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        scale = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
        binary = scale * torch.sign(w)
        clipped = torch.clamp(w, -1.0, 1.0)
        return self._conv_forward(x, binary.detach() - clipped.detach() + clipped, None)


class ReActBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, channels).reshape(1, channels, 1, 1))
        self.act, self.conv = ApproxSign(), ScaledSignConv(channels, channels, 3, padding=1, bias=False)
        self.norm, self.prelu = nn.BatchNorm2d(channels), nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.norm(self.conv(self.act(x + self.shift)))) + x


class ReActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.block, self.head = ReActBlock(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.bn(self.stem(x))).mean((2, 3)))


class BiRealSte(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.w, self.bn1, self.head = nn.Parameter(torch.randn(8, 8, 3, 3)), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn0(self.stem(x))
        h = self.bn1(F.conv2d(h + (torch.sign(h) - h).detach(), torch.sign(self.w), padding=1))
        return self.head((h + (torch.sign(h) - h).detach()).mean((2, 3)))


def _model(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return with_trained_norms(cls())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("larq_compute_engine") is None, reason="needs the [tflite] extra")
def test_reactnet_blocks_bit_pack_with_sign_as_step_and_stay_float_without(tmp_path):
    path = save_pt2(_model(ReActNet), torch.randn(2, 3, 9, 10), tmp_path / "react.pt2")
    became = {}
    for flag in (False, True):
        with contextlib.redirect_stdout(io.StringIO()):
            result = htaf_export.export(path, "tflite", tmp_path / f"r{flag}.tflite", device="cpu",
                                        sign_as_step=flag)
        assert result.report.passed, result.report.failure_line()
        became[flag] = {r.layer: r.became for r in result.conversion.rows}
        assert flag or any("--sign-as-step" in n for n in result.conversion.notes), result.conversion.notes
    assert "LceBconv2d" in became[True]["block.conv"] and "LceBconv2d" not in became[False]["block.conv"], became


@pytest.mark.slow
def test_a_pickled_bi_real_net_gets_integer_convs(tmp_path, monkeypatch):
    """A pickle is hardened through its traced program, its signs read as steps there."""
    module = type(sys)("user_bireal")
    module.BiRealSte = BiRealSte
    BiRealSte.__module__ = "user_bireal"
    monkeypatch.setitem(sys.modules, "user_bireal", module)
    path = tmp_path / "bireal.pth"
    torch.save(_model(BiRealSte), path)
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "onnx-int8", tmp_path / "b.onnx", device="cpu", trust_pickle=True,
                                    input_shape=[3, 9, 10], sign_as_step=True)
    assert result.report.passed, result.report.failure_line()
    assert "QLinearConv" in {r.layer: r.became for r in result.conversion.rows}["w"]
    # both signs run in the root module: one site, called twice
    assert [(s.levels, s.tie, s.how) for s in result.hardening.sites] == [
        ("pm1", "ge", "torch.sign read as a step (--sign-as-step)")], result.hardening.sites


def test_sign_as_step_on_torchscript_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.trace(_model(BiRealSte), torch.randn(2, 3, 9, 10)), str(path))
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "m.onnx"), "--input-shape", "3,9,10",
                   "--sign-as-step"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--sign-as-step" in err and ".pt2" in err and "\n" not in err, err
    assert not (tmp_path / "m.onnx").exists()
