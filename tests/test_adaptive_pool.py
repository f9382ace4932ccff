"""Adaptive average (and max) pools whose input size is not a multiple of their output size (AdaptiveAvgPool2d(3) on a
10×9 map, AdaptiveAvgPool1d(4) over 10 steps). PyTorch's exporter writes them as run-time index arithmetic,
which the TFLite targets refused ("Transpose … moves the batch axis") and its TorchScript exporter refuses
outright; capture now writes each bin as a slice and a mean. Parity is checked on the real interpreters."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from htaf_export import adaptive_pool
from htaf_export.nn import HTAF

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before anything imports TensorFlow: larq needs Keras 2
if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("larq_compute_engine") is None:
    pytest.skip("TFLite targets need the [tflite] extra", allow_module_level=True)

from htaf_export import tflite_file as tfl  # noqa: E402

from test_tflite_layers import _exported  # noqa: E402
from test_user_layers import SignConv2d  # noqa: E402


class PooledNet(nn.Module):
    """A stem, a pool to 3×4 bins of uneven size, a sign, a binary 1×1 conv, a pool to 2×2, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.act = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), HTAF(levels="pm1")
        self.pool, self.mix, self.act2 = nn.AdaptiveAvgPool2d((3, 4)), SignConv2d(8, 6, 1), HTAF()
        self.head_pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.mix(self.act(self.pool(self.bn(self.stem(x))))))
        return self.fc(self.head_pool(y).flatten(1))


class Pooled1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.pool, self.fc = nn.Conv1d(4, 8, 3, padding=1), HTAF(), nn.AdaptiveAvgPool1d(4), \
            nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


@pytest.mark.parametrize("size, out", [(10, 3), (7, 4), (9, 9), (5, 1), (8, 4)])
def test_bins_are_pytorchs(size, out):
    x = torch.arange(size, dtype=torch.float64)[None, None]
    means = [float(x[0, 0, a:b].mean()) for a, b in adaptive_pool._bins(size, out)]
    assert means == pytest.approx(nn.functional.adaptive_avg_pool1d(x, out).flatten().tolist())


@pytest.mark.parametrize(("fmt", "target"), [("pt2", "tflite"), ("torchscript", "tflite-float")])
def test_uneven_2d_pools_convert_with_parity(fmt, target, tmp_path):
    torch.manual_seed(1)
    result = _exported(PooledNet(), (3, 10, 9), fmt, target, tmp_path)
    ops = tfl.op_names(tfl.read_model(result.artifact.read_bytes()))
    assert "GATHER_ND" not in ops, ops
    assert target != "tflite" or "LceBconv2d" in ops, ops  # the binary conv reading the pooled signs
    steps = [t for t in result.report.backends[0].tensors if t.kind == "binary"]
    assert len(steps) == 2 and all(t.elements > 0 for t in steps), [(t.name, t.elements) for t in steps]


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_an_uneven_1d_pool_converts_with_parity(fmt, tmp_path):
    torch.manual_seed(2)
    _exported(Pooled1d(), (4, 10), fmt, "tflite", tmp_path)


class ExpandedBias(nn.Module):
    """ReActNet's LearnableBias: ``x + self.bias.expand_as(x)``, after which a TorchScript trace loses the
    spatial sizes on the way to the pool."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, channels, 1, 1) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.expand_as(x)


def test_a_global_pool_of_unknown_spatial_size_converts_from_torchscript(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), ExpandedBias(4), HTAF(levels="pm1"),
                          nn.Conv2d(4, 4, 3, padding=1), nn.PReLU(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    result = _exported(model, (1, 8, 8), "torchscript", "tflite-float", tmp_path)
    ops = tfl.op_names(tfl.read_model(result.artifact.read_bytes()))
    assert "MEAN" in ops or "AVERAGE_POOL_2D" in ops, ops


class MaxPooledNet(nn.Module):
    """A strided stem on an odd-sized image, ±1 signs, a max pool to 2×3 bins over a 6×4 map (uneven widths)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.act = nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), HTAF(levels="pm1")
        self.body, self.act2 = SignConv2d(8, 6, 3, stride=2), HTAF()
        self.pool, self.fc = nn.AdaptiveMaxPool2d((2, 3)), nn.Linear(36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act2(self.body(self.act(self.bn(self.stem(x)))))).flatten(1))


@pytest.mark.parametrize(("fmt", "target"), [("pt2", "tflite"), ("torchscript", "tflite-float")])
def test_adaptive_max_pools_convert_with_parity(fmt, target, tmp_path):
    """torch's exporter has no translation for aten.adaptive_max_pool2d (every target refused it) and its
    TorchScript exporter refuses uneven bins."""
    torch.manual_seed(4)
    _exported(MaxPooledNet(), (3, 27, 19), fmt, target, tmp_path)


class MaxWithIndices(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor):
        values, indices = self.pool(x)
        return values, indices


@pytest.mark.parametrize("pool, shape", [(nn.AdaptiveMaxPool2d((2, 3), return_indices=True), (2, 3, 6, 4)),
                                         (nn.AdaptiveMaxPool2d(2, return_indices=True), (2, 3, 6, 8)),
                                         (nn.AdaptiveMaxPool1d(3, return_indices=True), (2, 3, 10))])
def test_max_pool_indices_are_pytorchs(pool, shape):
    """The indices, which a model rarely reads, still mean what PyTorch's do (ties included: the first)."""
    import onnxruntime as ort

    x = torch.randint(-2, 3, shape).float()  # few values: many ties within a bin
    program = torch.onnx.export(MaxWithIndices(pool).eval(), (x,), dynamo=True, verbose=False,
                                custom_translation_table=adaptive_pool.TRANSLATIONS)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    values, indices = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    want_values, want_indices = pool(x)
    assert (values == want_values.numpy()).all() and (indices == want_indices.numpy()).all()
