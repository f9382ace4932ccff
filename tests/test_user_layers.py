"""Layers users write that were refused, crashed or were named wrongly: binary layers at each token of [N, L, F]
(bit-packed on TFLite, a MatMul in ONNX), LayerNorm on TFLite, an even kernel's 'same' padding before a binary
Conv1d, binary Conv1d on integer kernels (onnx-int8), nearest upsampling on TFLite, XNOR-Net's scale after a large
conv, parametrized weights, uint8 inputs, ``nn.Unflatten`` from a vector to a feature map, ``torch.einsum`` written for a dense layer."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before anything imports TensorFlow: larq needs Keras 2

import htaf_export  # noqa: E402
from htaf_export.errors import BadInput  # noqa: E402
from htaf_export.nn import HTAF  # noqa: E402
from htaf_export.passes.util import layer_of  # noqa: E402

from conftest import save_as_user, save_pt2  # noqa: E402

needs_tflite = pytest.mark.skipif(importlib.util.find_spec("larq_compute_engine") is None,
                                  reason="TFLite targets need the [tflite] extra")


def ste_sign(w: torch.Tensor) -> torch.Tensor:
    return w + (torch.where(w >= 0, 1.0, -1.0) - w).detach()


class SignLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, ste_sign(self.weight), self.bias)


class SignConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, ste_sign(self.weight), self.bias)


class SignConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, ste_sign(self.weight), self.bias)


class TokenNet(nn.Module):
    """Tokens [N, 7, 12]: an embedding, LayerNorm, a sign, a binary Linear at every token, a sign, a mean."""

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.embed, self.norm, self.act = nn.Linear(12, 32), nn.LayerNorm(32) if norm else nn.Identity(), \
            HTAF(levels="pm1")
        self.mix, self.act2, self.out = SignLinear(32, 32), HTAF(levels="pm1"), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.mix(self.act(self.norm(self.embed(x))))).mean(1))


class SameEven(nn.Module):
    """A binary Conv1d with padding='same' and an even kernel (PyTorch writes its padding as a separate Pad)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.s0 = nn.Conv1d(4, 16, 3, padding=1), HTAF(levels="pm1")
        self.c1, self.b1, self.s1 = SignConv1d(16, 16, 4, padding="same", bias=False), nn.BatchNorm1d(16), \
            HTAF(levels="pm1")
        self.c2, self.b2, self.s2 = SignConv1d(16, 8, 3, bias=False), nn.BatchNorm1d(8), HTAF(levels="pm1")
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.s1(self.b1(self.c1(self.s0(self.c0(x)))))
        return self.fc(self.s2(self.b2(self.c2(h))).amax(-1))


def _export(model: nn.Module, shape: tuple[int, ...], target: str, tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    path = save_pt2(model.eval(), torch.randn(2, *shape), tmp_path / "m.pt2")
    out = tmp_path / ("m.onnx" if target.startswith("onnx") else "m.tflite")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, target, out, device="cpu")
    assert result.report.passed, result.report.failure_line()
    return result


@pytest.mark.slow
@needs_tflite
def test_a_binary_linear_at_every_token_bit_packs_and_layer_norm_converts(tmp_path):
    result = _export(TokenNet(), (7, 12), "tflite", tmp_path)
    rows = {r.layer: r.became for r in result.conversion.rows}
    assert rows["mix"] == "LceBconv2d (bit-packed)", rows


@pytest.mark.slow
def test_a_binary_linear_at_every_token_exports_to_onnx_with_rounding_bounds(tmp_path):
    result = _export(TokenNet(norm=False), (7, 12), "onnx", tmp_path)  # its step became a Gemm on 3-D: a crash
    assert not any("rounding bounds are not available" in n for n in result.report.notes), result.report.notes


@pytest.mark.slow
@needs_tflite
@pytest.mark.parametrize("target", ["tflite", "onnx-int8"])
def test_same_padding_with_an_even_kernel_before_a_binary_conv1d(tmp_path, target):
    result = _export(SameEven(), (4, 21), target, tmp_path, seed=3)
    rows = [(r.layer, r.became) for r in result.conversion.rows]
    if target == "onnx-int8":  # 1-D convs run as height-1 2-D ones on the integer kernels
        assert ("c2", "QLinearConv (threshold)") in rows, rows


class Upsampled(nn.Module):
    """A sign, nearest upsampling by 2, a binary conv, and both resizing forms of F.interpolate."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.a0, self.up = nn.Conv2d(1, 8, 3, padding=1), HTAF(levels="pm1"), nn.Upsample(scale_factor=2)
        self.c1, self.bn, self.a1 = SignConv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), HTAF(levels="pm1")
        self.fc = nn.Linear(8 * 5 * 7, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.interpolate(self.a1(self.bn(self.c1(self.up(self.a0(self.c0(x)))))), scale_factor=0.5)
        return self.fc(h.flatten(1)), F.interpolate(h, size=(7, 9))


@pytest.mark.slow
@needs_tflite
def test_nearest_upsampling_converts_and_the_binary_conv_after_it_bit_packs(tmp_path):
    rows = {r.layer: r.became for r in _export(Upsampled(), (1, 5, 7), "tflite", tmp_path).conversion.rows}
    assert rows.get("c1") == "LceBconv2d (bit-packed)", rows


class XnorConv(nn.Conv2d):
    """XNOR-Net: ±1 weights, and the mean |w| of each filter multiplied after the conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.weight.abs().mean(dim=(1, 2, 3))
        return F.conv2d(x, ste_sign(self.weight), None, self.stride, self.padding) * alpha[None, :, None, None]


@pytest.mark.slow
@needs_tflite
def test_xnor_scale_after_a_conv_of_more_than_8192_weights_bit_packs(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.sign = nn.Conv2d(3, 32, 1), HTAF(levels="pm1")
            self.xconv, self.fc = XnorConv(32, 32, 3, bias=False), nn.Linear(32 * 5 * 4, 4)  # 9,216 weights

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.xconv(self.sign(self.stem(x))).flatten(1))

    rows = {r.layer: r.became for r in _export(Net(), (3, 7, 6), "tflite", tmp_path).conversion.rows}
    assert rows.get("xconv") == "LceBconv2d (bit-packed)", rows


def test_a_parametrized_weight_belongs_to_its_module():
    assert layer_of("body.parametrizations.weight.original") == "body"
    assert layer_of("blocks.0.conv.weight") == "blocks.0.conv"


def test_a_parametrized_binary_conv_is_named_after_its_module(tmp_path):
    class Sign(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return ste_sign(w)

    model = nn.Sequential(HTAF(levels="pm1"), nn.Conv2d(2, 4, 3, bias=False), HTAF(levels="pm1"), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 2))
    parametrize.register_parametrization(model[1], "weight", Sign())
    result = _export(model, (2, 5, 5), "onnx", tmp_path)
    assert ("1", "packed 1-bit weights") in [(r.layer, r.became) for r in result.conversion.rows]


def test_uint8_inputs_are_refused_in_one_line_that_says_so(tmp_path):
    class Images(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.step, self.fc = nn.Conv2d(1, 4, 3), HTAF(levels="pm1"), nn.Linear(4 * 4 * 4, 3)

        def forward(self, img: torch.Tensor) -> torch.Tensor:
            return self.fc(self.step(self.conv(img.float() / 255.0)).flatten(1))

    path = save_pt2(Images().eval(), torch.randint(0, 256, (2, 1, 6, 6), dtype=torch.uint8), tmp_path / "u.pt2")
    with pytest.raises(BadInput, match="takes uint8 inputs") as refused:
        htaf_export.export(path, "onnx", tmp_path / "u.onnx", device="cpu")
    assert "\n" not in str(refused.value) and not (tmp_path / "u.onnx").exists()


def test_nearest_upsampling_before_a_binary_conv_runs_on_integer_kernels(tmp_path):
    """onnx-int8: the upsampling replays on the uint8 codes, so the binary conv after it is integer too."""
    rows = {r.layer: r.became for r in _export(Upsampled(), (1, 5, 7), "onnx-int8", tmp_path).conversion.rows}
    assert rows.get("c1") == "QLinearConv (threshold)", rows


class Unflattened(nn.Module):
    """A vector decoded to a feature map (``nn.Unflatten``), then a binary conv on it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.a0, self.grid = nn.Linear(12, 32), HTAF(levels="pm1"), nn.Unflatten(1, (2, 4, 4))
        self.conv, self.head = SignConv2d(2, 3, 3, padding=1, bias=False), nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.grid(self.a0(self.fc(x)))).flatten(1))


@pytest.mark.slow
@needs_tflite
@pytest.mark.parametrize("fmt", ["pt", "pt2"])
def test_unflatten_converts_from_either_format_and_keeps_derived_bounds(tmp_path, fmt):
    """A TorchScript trace writes the target shape as Concat(Slice(Shape(x), 0, 1), [2, 4, 4], Slice(Shape(x), 2,
    ∞)), which the TFLite builder once could not read; a .pt2 names ``aten.unflatten``, which had no rounding rule."""
    torch.manual_seed(0)
    path = save_as_user(Unflattened().eval(), torch.randn(2, 12), tmp_path / f"u.{fmt}", fmt)
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite", tmp_path / "u.tflite", device="cpu", input_shape=[12])
    assert result.report.passed, result.report.failure_line()
    assert not any("rounding bounds are not available" in n for n in result.report.notes), result.report.notes
    rows = {r.layer: r.became for r in result.conversion.rows}
    assert rows.get("conv") == "LceBconv2d (bit-packed)", rows


class EinsumNet(nn.Module):
    """Dense layers written as einsum on ±1 weights computed inline (at each token, then on the pooled vector)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.a0 = nn.Linear(6, 12), HTAF(levels="pm1")
        self.w1 = nn.Parameter(torch.randn(10, 12))
        self.bn, self.a1 = nn.BatchNorm1d(5), HTAF(levels="pm1")
        self.w2 = nn.Parameter(torch.randn(3, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bti,oi->bto", self.a0(self.embed(x)), ste_sign(self.w1))
        return torch.einsum("bi,io->bo", self.a1(self.bn(h)).mean(1), ste_sign(self.w2).t())


def test_einsum_equations_that_are_a_matrix_product_are_found():
    from htaf_export.passes.einsum import _matmul_axes

    assert _matmul_axes("bi,oi->bo") == ("bi", "oi", "bo", "i")
    assert _matmul_axes("bti,io->tbo") == ("bti", "io", "tbo", "i")
    assert _matmul_axes("bij,jk->bik") == ("bij", "jk", "bik", "j")
    for other in ("bi,bi->b", "ij,jk,kl->il", "...i,oi->...o", "bii,oi->bo", "bij,ijk->bk", "bi,oi->boi"):
        assert _matmul_axes(other) is None, other


@pytest.mark.slow
@needs_tflite
@pytest.mark.parametrize("target", ["tflite", "onnx-int8"])
def test_einsum_dense_layers_are_binary_layers(tmp_path, target):
    """TFLite refused Einsum ('no TFLite translation'); now each is the MatMul it is, binary on ±1 weights and
    named after its parameter."""
    rows = {r.layer: r.became for r in _export(EinsumNet(), (5, 6), target, tmp_path).conversion.rows}
    assert rows.get("w1", "").startswith(("LceBconv2d", "MatMulInteger")), rows


class RecurrentSign(nn.Module):
    """One ±1 recurrent weight used at every time step of [N, T, F] (a binary RNN cell written by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.wx, self.wh, self.bn = nn.Linear(7, 12, bias=False), nn.Linear(12, 12, bias=False), nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.size(0), 12)
        for t in range(x.size(1)):
            h = torch.where(self.bn(self.wx(x[:, t])) + F.linear(h, ste_sign(self.wh.weight)) >= 0, 1.0, -1.0)
        return self.head(h)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx-int8", "qonnx"])
def test_a_binary_weight_used_at_every_time_step_lowers_once_per_call(tmp_path, target):
    """Each call was lowered under the layer's name: two nodes of one name (ONNX Runtime refused the onnx-int8
    file) and a value written twice (qonnx: an internal error)."""
    if target == "qonnx":
        pytest.importorskip("qonnx")
    torch.manual_seed(0)
    model = RecurrentSign()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    path = save_pt2(model.eval(), torch.randn(2, 5, 7), tmp_path / "rnn.pt2")
    out = tmp_path / ("rnn.int8.onnx" if target == "onnx-int8" else "rnn.qonnx.onnx")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, target, out, device="cpu")
    assert result.report.passed, result.report.failure_line()
    import onnx

    nodes = onnx.load(str(out)).graph.node
    names = [n.name for n in nodes]
    assert len(names) == len(set(names))
    # one weight (and one unpacking of it) for every time step, not a copy per step
    read = {n.input[1] for n in nodes if n.op_type in ("MatMulInteger", "MatMul") and n.name.startswith("wh/")}
    assert target != "onnx-int8" or len(read) == 1, read
    # the weight binarized anew at each step folds to one parameter's weight, named after it (was `add_64`)
    assert "wh" in {r.layer for r in result.conversion.rows}, result.conversion.rows


class VideoNet(nn.Module):
    """Short clips [N, C, T, H, W]: a float Conv3d stem, then a bias-free Conv3d on binarized weights."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = nn.Conv3d(2, 6, 3, padding=1), nn.Conv3d(6, 8, (2, 3, 3), bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.where(self.stem(x) >= 0, 1.0, -1.0)
        h = (F.conv3d(h, ste_sign(self.body.weight), None, (1, 2, 2)) >= 0).float()
        return self.head(h.mean((2, 3, 4)))


@pytest.mark.parametrize("target", ["onnx", "onnx-int8"])
def test_a_bias_free_conv3d_on_computed_weights_exports(tmp_path, target):
    """torch's exporter gives it a [C_out, 2] zero bias that ONNX Runtime refuses (was an internal error)."""
    result = _export(VideoNet(), (2, 4, 9, 7), target, tmp_path)
    assert any(t.kind == "binary" and t.elements > 0 for b in result.report.backends for t in b.tensors)
