"""A binary U-Net's pieces on the TFLite targets: GroupNorm and InstanceNorm (the exporter writes GroupNorm as an
InstanceNormalization between reshapes, the last one to another tensor's shape), and ConvTranspose2d with the
paddings PyTorch allows (output_padding past the full output adds rows of bias alone). Every step is located in
the file and validated; the outputs match on the real interpreters."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before anything imports TensorFlow: larq needs Keras 2
if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("larq_compute_engine") is None:
    pytest.skip("TFLite targets need the [tflite] extra", allow_module_level=True)

from test_tflite_layers import _exported  # noqa: E402
from test_user_layers import SignConv2d  # noqa: E402


def pm1(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


class Decoder(nn.Module):
    """Encoder with GroupNorm, a binary stride-2 conv with InstanceNorm, three learned upsamplings."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.gn = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.down, self.inorm = SignConv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.InstanceNorm2d(16, affine=True)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.up_padded = nn.ConvTranspose2d(16, 4, 3, stride=2, padding=1, output_padding=1)
        self.up_past = nn.ConvTranspose2d(16, 3, 3, stride=2, output_padding=1)  # 13 rows computed, 14 kept
        self.out = nn.Conv2d(12, 2, 1)
        with torch.no_grad():
            for norm in (self.gn, self.inorm):
                norm.weight.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = pm1(self.inorm(self.down(pm1(self.gn(self.enc(x))))))
        return self.out(torch.cat([self.up(d), self.up_padded(d)], 1)), self.up_past(d).mean((2, 3))


@pytest.mark.parametrize(("fmt", "target"), [("pt2", "tflite-float"), ("torchscript", "tflite")])
def test_a_binary_unet_decoder_converts_with_parity(fmt, target, tmp_path):
    torch.manual_seed(0)
    result = _exported(Decoder(), (1, 12, 10), fmt, target, tmp_path)
    rows = {r.layer: r for r in result.conversion.rows}
    assert all(rows[n].became.startswith("TRANSPOSE_CONV") for n in ("up", "up_padded", "up_past")), rows
    steps = [t for t in result.report.backends[0].tensors if t.kind == "binary"]
    assert len(steps) == 2 and all(t.elements > 0 for t in steps), [(t.name, t.elements) for t in steps]
    assert not any("not observable" in r.became for r in result.conversion.rows)
