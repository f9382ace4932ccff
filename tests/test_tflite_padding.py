"""What PyTorch users put around binary convs that the TFLite targets once refused: reflect, circular and
replicate padding (``padding_mode``) in front of them, and smooth activations (GELU, ELU, SELU, CELU, softplus,
hard sigmoid/swish, mish). The padding copies ±1 values, so the convs behind it stay binary on every target."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before anything imports TensorFlow: larq needs Keras 2
if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("larq_compute_engine") is None:
    pytest.skip("TFLite targets need the [tflite] extra", allow_module_level=True)

import htaf_export  # noqa: E402
from htaf_export import tflite_file as tfl  # noqa: E402

from conftest import save_as_user, save_pt2, with_trained_norms  # noqa: E402

SHAPE = (1, 11, 10)


class SignConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + (self.weight.sign() - self.weight).detach()
        return self._conv_forward(x, w, self.bias)


class Sign(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class PaddedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0, self.sign = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), Sign()
        self.mirror = SignConv(8, 8, 3, padding=1, padding_mode="reflect", bias=False)
        self.ring = SignConv(8, 8, 3, padding=1, padding_mode="circular", groups=8, bias=False)
        self.edge = SignConv(8, 8, 3, padding=2, padding_mode="replicate", bias=False)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sign(self.bn0(self.stem(x)))
        h = self.sign(self.bn1(self.mirror(h)))
        h = self.sign(self.bn2(self.ring(h)))
        return self.head(F.gelu(self.bn3(self.edge(h))).mean((2, 3)))


def _export(fmt: str, target: str, tmp_path):
    torch.manual_seed(0)
    model = with_trained_norms(PaddedNet())
    path = save_as_user(model, torch.randn(2, *SHAPE), tmp_path / f"padded.{'pt2' if fmt == 'pt2' else 'ts.pt'}", fmt)
    suffix = ".onnx" if target.startswith("onnx") else ".tflite"
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, target, tmp_path / f"padded{suffix}", input_shape=list(SHAPE),
                                    device="cpu")
    assert result.report.passed, result.report.failure_line()
    return result, {r.layer: r.became for r in result.conversion.rows}


@pytest.mark.slow
def test_binary_convs_behind_reflect_and_replicate_padding_bit_pack(tmp_path):
    result, became = _export("pt2", "tflite", tmp_path)
    ops = tfl.op_names(tfl.read_model(result.artifact.read_bytes()))
    assert "LceBconv2d" in became["mirror"] and "LceBconv2d" in became["edge"], became
    assert {"MIRROR_PAD", "GELU"} <= set(ops), ops
    assert not any("rounding bounds are not available" in n for n in result.report.notes), result.report.notes


@pytest.mark.slow
def test_torchscript_gelu_and_reflect_padding_on_tflite_int8(tmp_path):
    result, became = _export("torchscript", "tflite-int8", tmp_path)
    assert "int8" in became["mirror"], became
    assert "GELU" in tfl.op_names(tfl.read_model(result.artifact.read_bytes()))


@pytest.mark.slow
def test_every_padding_mode_keeps_integer_convs_on_onnx_int8(tmp_path):
    _, became = _export("pt2", "onnx-int8", tmp_path)
    assert all("float" not in became[name] for name in ("mirror", "ring", "edge")), became


class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 9), nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (F.elu(self.a(x), alpha=0.5) > 0).float()
        z = self.b(h)
        return torch.cat([F.gelu(z, approximate="tanh"), F.selu(z), F.celu(z, 0.7), F.softplus(z),
                          F.hardsigmoid(z), F.hardswish(z), F.mish(z), F.silu(z), F.elu(z)], 1)


@pytest.mark.slow
def test_smooth_activations_convert_to_tflite_float_under_derived_tolerances(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "smooth.pt2"
    save_pt2(Smooth().eval(), torch.randn(2, 6), path)
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite-float", tmp_path / "s.tflite", device="cpu")
    assert result.report.passed, result.report.failure_line()
    assert not any("rounding bounds are not available" in n for n in result.report.notes), result.report.notes
    assert "ELU" in tfl.op_names(tfl.read_model(result.artifact.read_bytes()))


class OneSided(nn.Module):
    """Replicate and circular padding trimmed to one side (stride 2 on an even map), and padding of the width
    only: the sides without padding gather nothing (was an internal error)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, stride=2, padding=1, padding_mode="replicate")
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(4 * 2 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.a(x) > 0).float()
        return self.fc(self.b(F.pad(h, (1, 1, 0, 0), "replicate")).flatten(1))


@pytest.mark.slow
def test_padding_on_one_side_only_converts(tmp_path):
    torch.manual_seed(0)
    path = save_pt2(OneSided().eval(), torch.randn(2, 1, 8, 8), tmp_path / "one.pt2")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite-float", tmp_path / "one.tflite", device="cpu")
    assert result.report.passed, result.report.failure_line()
