"""Layers users write that the TFLite targets build: a crop written as tensor slicing (``y[:, :, 1:-1, 2:]``)
becomes a strided slice; a grouped (not depthwise) conv becomes one grouped CONV_2D, int8 in tflite-int8."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from pathlib import Path

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

from conftest import SAMPLE_DIR, digits_subset, save_as_user, save_pt2  # noqa: E402
from spiking_models import AudioSNN  # noqa: E402
from test_user_layers import SignConv2d  # noqa: E402

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


class SignConv1d(nn.Conv1d):
    """A user's binary Conv1d: ±1 weights through a straight-through sign of their own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + (torch.where(self.weight >= 0, 1.0, -1.0) - self.weight).detach()
        return F.conv1d(x, w, None, self.stride, self.padding)


class KeywordNet(nn.Module):
    """Keyword spotting on 13 MFCCs × 49 frames: a float Conv1d stem, two binary Conv1d, a pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn, self.act0 = nn.Conv1d(13, 32, 3, padding=1), nn.BatchNorm1d(32), HTAF(levels="pm1")
        self.body, self.body_bn, self.act1 = SignConv1d(32, 32, 3, padding=1, bias=False), nn.BatchNorm1d(32), \
            HTAF(levels="pm1")
        self.down, self.down_bn, self.act2 = SignConv1d(32, 24, 5, stride=2, bias=False), nn.BatchNorm1d(24), \
            HTAF(levels="pm1")
        self.pool, self.head = nn.MaxPool1d(2), nn.Linear(24, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act1(self.body_bn(self.body(self.act0(self.stem_bn(self.stem(x)))))))
        h = self.act2(self.down_bn(self.down(h)))
        return self.head(F.adaptive_avg_pool1d(h, 1).flatten(1))


class FrameHead(nn.Module):
    """Per-frame scores: the model ends in a 1×1 Conv1d, so the graph's output is a 1-D map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fire, self.frames = nn.Conv1d(5, 8, 3, padding=2, dilation=2), HTAF(), nn.Conv1d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frames(F.avg_pool1d(self.fire(self.conv(x)), 3, 1, 1))


def _exported(model: nn.Module, shape: tuple[int, ...], fmt: str, target: str, tmp_path, data=None):
    """``model`` with random batch-norm statistics, saved as a user would (``fmt``), exported to ``target``
    (validated on ``data``, else the default data)."""
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    path = save_as_user(model.eval(), torch.randn(2, *shape), tmp_path / f"m.{'pt2' if fmt == 'pt2' else 'ts.pt'}",
                        fmt)
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, target, tmp_path / "m.tflite", input_shape=list(shape), device="cpu",
                                    data=data)
    assert result.report.passed, result.report.failure_line()
    return result


@pytest.mark.slow
@pytest.mark.parametrize("fmt, target", [("pt2", "tflite"), ("torchscript", "tflite-int8")])
def test_a_binary_conv1d_keyword_net_exports_to_tflite_with_parity(tmp_path, fmt, target):
    torch.manual_seed(5)
    result = _exported(KeywordNet(), (13, 49), fmt, target, tmp_path)
    ops = tfl.op_names(tfl.read_model(result.artifact.read_bytes()))
    assert "CONV_2D" in ops, ops  # the stem, as a height-1 2-D conv
    assert target != "tflite" or ops.count("LceBconv2d") == 2, ops
    binary = [r.became for r in result.conversion.rows if r.layer in ("body", "down")]
    assert target != "tflite-int8" or binary == ["int8 CONV_2D (threshold)"] * 2, binary
    steps = {t.name for b in result.report.backends for t in b.tensors if t.kind == "binary"}
    assert {"act0", "act1", "act2"} <= {name.split("/")[-1] for name in steps}, steps


@pytest.mark.slow
def test_a_conv1d_as_the_last_layer_exports_to_tflite_float_with_parity(tmp_path):
    torch.manual_seed(6)
    result = _exported(FrameHead(), (5, 17), "pt2", "tflite-float", tmp_path)
    ops = tfl.op_names(tfl.read_model(result.artifact.read_bytes()))
    assert ops.count("CONV_2D") == 2 and "AVERAGE_POOL_2D" in ops, ops


@pytest.mark.parametrize("batch", [None, 2])
def test_a_conv1d_spiking_net_exports_to_tflite_at_any_or_its_fixed_batch(tmp_path, batch):
    """Its zero initial membrane times the leak is a constant the converter folds, then lifts to 2-D for the
    Conv1d; a .pt2 exported at batch 2 without a dynamic batch writes that batch into its zeros."""
    torch.manual_seed(0)
    model, path = AudioSNN().eval(), tmp_path / "audio.pt2"
    x = torch.randn(2, 5, 20)
    if batch is None:
        save_pt2(model, x, path)
    else:
        torch.export.save(torch.export.export(model, (x,)), path)
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite", tmp_path / "audio.tflite", device="cpu")
    assert result.report.passed, result.report.failure_line()
    steps = [t for b in result.report.backends for t in b.tensors if t.kind == "binary" and t.elements > 0]
    assert len(steps) >= 8, [t.name for t in steps]


class ShuffledChannels(nn.Module):
    """ShuffleNet's channel shuffle written with ``x.shape`` (a TorchScript trace computes ``c // groups`` in the
    graph) and a branch widened with ``repeat`` (an Expand the exporter leaves unshaped, then a Tile)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.sign = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), HTAF(levels="pm1")
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sign(self.bn(self.stem(x)))
        n, c, height, width = h.shape
        h = h.view(n, 2, c // 2, height, width).transpose(1, 2).reshape(n, c, height, width)
        p, q = torch.split(h, [6, 2], dim=1)
        return self.head(p + 0.5 * q.repeat(1, 3, 1, 1))


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_a_channel_shuffle_and_a_repeat_convert_to_tflite(tmp_path, fmt):
    """Both were refused: 'the IR does not know the shape of this tensor' (repeat), 'reshape of a constant'
    (the traced c // 2)."""
    torch.manual_seed(7)
    result = _exported(ShuffledChannels(), (2, 6, 6), fmt, "tflite-float", tmp_path)
    assert "TILE" in tfl.op_names(tfl.read_model(result.artifact.read_bytes()))


class FrameClassifier(nn.Module):
    """A dilated Conv1d, its batch norm and a sign, then a Linear at each time step ([N, L, C] after a transpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv1d(6, 16, 3, padding=2, dilation=2), nn.BatchNorm1d(16), \
            HTAF(levels="pm1")
        self.proj = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.bn(self.conv(x))).transpose(1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("fmt, target", [("torchscript", "tflite"), ("pt2", "tflite-int8")])
def test_a_linear_at_each_time_step_exports_to_tflite_with_parity(tmp_path, fmt, target):
    torch.manual_seed(7)
    result = _exported(FrameClassifier(), (6, 21), fmt, target, tmp_path)
    rows = {r.layer: r.became for r in result.conversion.rows}
    assert rows.get("proj") == "CONV_2D (float)", rows  # a 1×1 conv at each step; named after its module
    assert "conv" in rows, rows


class DilatedNet(nn.Module):
    """Dilated binary convs (a temporal conv net's or a segmentation net's context): 'same' and unpadded."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0, self.sign = nn.Conv2d(2, 16, 3, padding=1), nn.BatchNorm2d(16), HTAF(levels="pm1")
        self.wide, self.bn1, self.fire = SignConv2d(16, 16, 3, padding=2, dilation=2, bias=False), \
            nn.BatchNorm2d(16), HTAF(levels="pm1")
        self.tall, self.head = SignConv2d(16, 8, 3, dilation=(1, 3), bias=False), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fire(self.bn1(self.wide(self.sign(self.bn0(self.stem(x))))))
        return self.head(self.tall(h).mean((2, 3)))


def test_dilated_binary_convs_bit_pack_on_both_lce_kernels(tmp_path):
    torch.manual_seed(3)
    result = _exported(DilatedNet(), (2, 11, 13), "pt2", "tflite", tmp_path)
    rows = {r.layer: r.became for r in result.conversion.rows}
    assert rows["wide"] == rows["tall"] == "LceBconv2d (bit-packed)", rows
    assert {b.backend for b in result.report.backends} >= {"lce-default", "lce-indirect-bgemm"}


class BinaryGru(nn.Module):
    """A GRU cell unrolled over the time steps, a sign on its state (the zero initial state made with new_zeros),
    a chunk of the state into two heads, and a class index as a second output."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.GRUCell(6, 16), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.shape[0], 16)
        for t in range(4):
            h = torch.where(self.cell(x[:, t], h) >= 0, 1.0, -1.0)
        # traced, chunk computes its sizes from the shape at run time: capture must fold them
        first, second = h.chunk(2, dim=1)
        logits = self.head(first) + self.head(second)
        return logits, (logits > 0).long()


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_a_binary_gru_loop_converts_with_every_step_checked(fmt, tmp_path):
    torch.manual_seed(4)
    result = _exported(BinaryGru(), (4, 6), fmt, "tflite", tmp_path)
    steps = [t for t in result.report.backends[0].tensors if t.kind == "binary"]
    assert len(steps) == 4 and all(t.elements > 0 for t in steps), [(t.name, t.elements) for t in steps]


class SignBeside(nn.Module):
    """A step and a torch.sign read the same binary layer's integer sum: on its exact ties (0) the sign gives 0,
    the step +1. Validation must read the step's own tensor, not the sign's."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(64, 96, bias=False), nn.Linear(96, 48, bias=False), \
            nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sign = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
        h = nn.functional.linear(sign(self.first(x.flatten(1))), sign(self.second.weight))
        return self.head(sign(h) + 0.5 * torch.sign(h))


def test_a_step_beside_a_sign_of_the_same_sum_is_validated_from_its_own_tensor(tmp_path):
    torch.manual_seed(6)
    result = _exported(SignBeside(), (1, 8, 8), "pt2", "tflite", tmp_path, _digits(tmp_path))
    rows = {r.layer: r.became for r in result.conversion.rows}
    assert not any(v.startswith("SIGN") for v in rows.values()), rows
    logits = next(t for t in result.report.backends[0].tensors if t.kind == "float")
    steps = {t.name: t for t in result.report.backends[0].tensors if t.kind == "binary"}
    assert logits.elements > 0 and all(t.tie_violations == 0 for t in steps.values())
    assert sum(t.exact_ties for t in steps.values()) > 0  # the ties were there to be read


def _digits(folder) -> Path:
    """The first DIGITS_SAMPLES digits as [1, 8, 8] samples (all 1,797 with HTAF_FULL_MATRIX=1)."""
    return digits_subset(SAMPLE_DIR / "bnn_cnn.pt", folder)


def _sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


class Shuffled(nn.Module):
    """Sub-pixel upsampling of binary maps (``nn.PixelShuffle``), then a strided conv back down."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.ps = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PixelShuffle(2)
        self.c2, self.fc = nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(self.ps(_sign(self.bn(self.c1(x))))).flatten(1))


class Smoothed(nn.Module):
    """Bilinear upsampling of a binary map, with half pixels and with aligned corners."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _sign(self.bn(self.c1(x)))
        up = [F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=corners) for corners in (False, True)]
        return self.c2(torch.cat(up, dim=1))


class XnorScaled(nn.Module):
    """XNOR-Net's binary conv scaled by K, the mean |input| over channels averaged over each 3×3 window: a
    [N, 1, H, W] map broadcast over the conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv, self.fc = nn.BatchNorm2d(1), nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn(x)
        k = F.avg_pool2d(a.abs().mean(1, keepdim=True), 3, stride=1, padding=1)
        return self.fc((F.conv2d(_sign(a), _sign(self.conv.weight), padding=1) * k).flatten(1))


class Attending(nn.Module):
    """Self-attention over the 8 rows of a digit, binary queries and keys."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 8, 8)
        att = torch.softmax(_sign(self.q(x)) @ _sign(self.k(x)).transpose(1, 2) / 8 ** 0.5, dim=-1)
        return self.fc((att @ self.v(x)).flatten(1))


class HeadsAttending(nn.Module):
    """timm's multi-head attention: one qkv projection, ``reshape(N, L, 3, H, D).permute(2, 0, 3, 1, 4)``, then
    ``q, k, v = qkv`` (a transpose that moves the batch, each part read on its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.fc = nn.Linear(8, 24), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x.reshape(n, 8, 8)).reshape(n, 8, 3, 2, 4).permute(2, 0, 3, 1, 4)
        att = torch.softmax(_sign(q) @ _sign(k).transpose(-2, -1) / 2.0, dim=-1)
        return self.fc((att @ v).transpose(1, 2).reshape(n, 64))


@pytest.mark.parametrize(("model", "target", "op"), [(Shuffled, "tflite", "DEPTH_TO_SPACE"),
                                                     (HeadsAttending, "tflite-float", "BATCH_MATMUL"),
                                                     (Smoothed, "tflite-float", "RESIZE_BILINEAR"),
                                                     (XnorScaled, "tflite", "LceBconv2d"),
                                                     (Attending, "tflite-float", "BATCH_MATMUL")])
def test_pixel_shuffle_bilinear_xnor_scales_and_attention_convert_with_parity(model, target, op, tmp_path):
    torch.manual_seed(7)
    result = _exported(model(), (1, 8, 8), "pt2", target, tmp_path, _digits(tmp_path))
    assert op in tfl.op_names(tfl.read_model(result.artifact.read_bytes()))
    assert not any("rounding bounds are not available" in n for n in result.report.notes), result.report.notes


class EventLoopRate(nn.Module):
    """An event stream [N, T, F] read ``x[:, t]`` with a plain LIF, the output divided by ``T = x.shape[1]``: a
    TorchScript trace keeps T as Shape → Gather, a dimension the TFLite file fixes."""

    def __init__(self) -> None:
        super().__init__()
        self.encode, self.readout = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, v, total = x.shape[1], torch.zeros(x.shape[0], 12), 0
        for t in range(steps):
            v = 0.9 * v + self.encode(x[:, t])
            s = (v >= 0.5).float()
            v = v - s * 0.5
            total = total + self.readout(s)
        return total / steps


def test_a_traced_loop_dividing_by_its_step_count_converts_to_tflite(tmp_path):
    """Was an internal error ('NoneType' object has no attribute 'shape') on the TorchScript file."""
    torch.manual_seed(8)
    result = _exported(EventLoopRate(), (4, 6), "torchscript", "tflite-float", tmp_path)
    assert sum(t.elements for b in result.report.backends for t in b.tensors if t.kind == "binary") > 0
