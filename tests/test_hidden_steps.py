"""A binary MLP-Mixer block as users write it (LayerNorm, a ±1 sign by torch.where, token mixing through a
transpose): on TFLite two of its steps are fused into kernels, so no tensor of the file holds them. A sample whose
pre-activation at such a step lies within rounding of the threshold may flip there unseen; its outputs are not
compared (and the report counts them), the others' are: a threshold moved across one sum still fails. Crafted inputs
also put LayerNorm rows of tiny values through runtimes that flush subnormals, which the bound must allow."""

from __future__ import annotations

import contextlib
import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import htaf_export
from htaf_export import cli

from conftest import save_pt2

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs the [tflite] extra")


def _signed(w: torch.Tensor) -> torch.Tensor:
    return w + (torch.sign(w) - w).detach()


class MixerBlock(nn.Module):
    def __init__(self, tokens: int = 7, channels: int = 9) -> None:
        super().__init__()
        self.ln1, self.tok = nn.LayerNorm(channels), nn.Linear(tokens, tokens, bias=False)
        self.ln2, self.ch = nn.LayerNorm(channels), nn.Linear(channels, 16, bias=False)
        self.bn, self.head = nn.BatchNorm1d(tokens), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.where(self.ln1(x) >= 0, 1.0, -1.0)
        x = x + F.linear(h.transpose(1, 2), _signed(self.tok.weight)).transpose(1, 2)
        h = torch.where(self.ln2(x) >= 0, 1.0, -1.0)
        h = torch.where(self.bn(F.linear(h, _signed(self.ch.weight))) >= 0, 1.0, -1.0)
        return self.head(h.mean(dim=1))


@pytest.fixture(scope="module")
def mixer(tmp_path_factory):
    torch.manual_seed(0)
    model = MixerBlock()
    with torch.no_grad():  # as training leaves a batch norm (without the fix, seeds 0 to 3 all failed a correct file)
        model.bn.running_mean.normal_(0, 0.3)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight.normal_()
        model.bn.bias.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("mixer")
    path = save_pt2(model.eval(), torch.randn(2, 7, 9), folder / "mixer.pt2")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite-float", folder / "mixer.tflite", device="cpu")
    return model, folder, result


@pytest.mark.slow
def test_a_mixer_block_passes_and_says_which_samples_it_spared(mixer):
    _, _, result = mixer
    assert result.report.passed, result.report.failure_line()
    unseen = [r.layer for r in result.conversion.rows if r.became == "not observable"]
    assert unseen, [(r.layer, r.became) for r in result.conversion.rows]
    spared = [n for n in result.report.notes if "holds in no tensor" in n]
    samples = result.report.inputs["samples"] if isinstance(result.report.inputs, dict) else None
    assert spared and (samples is None or int(spared[0].split()[0]) < samples / 4), (spared, samples)


@pytest.mark.slow
def test_a_threshold_moved_one_sum_at_a_hidden_step_still_fails(mixer, capsys):
    """The hidden step after the batch norm reads sums of nine ±1 products (odd integers): a running mean moved by
    2 moves its threshold across one possible sum, a defect in the file's arithmetic that only the outputs show."""
    model, folder, result = mixer
    with torch.no_grad():
        model.bn.running_mean[int(model.bn.weight.abs().argmax())] += 2.0
    nudged = save_pt2(model.eval(), torch.randn(2, 7, 9), folder / "nudged.pt2")
    capsys.readouterr()
    code = cli.main(["validate", str(nudged), str(result.artifact), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1 and "parity FAILED" in out, out
