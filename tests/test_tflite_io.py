"""How a TFLite file takes its inputs and gives its outputs, fed as a user feeds it (the interpreter, by name):
an image input is channels last and the summary and ``inspect`` say so; a model that takes channels-last input
itself (``x.permute(0, 3, 1, 2)``) gets a file that takes the same tensor; several inputs and outputs carry the
model's names in the file's signature."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before anything imports TensorFlow: larq needs Keras 2
if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("TFLite targets need the [tflite] extra", allow_module_level=True)

import htaf_export  # noqa: E402
from htaf_export import cli  # noqa: E402



class ChannelsLast(nn.Module):
    """Takes [N, H, W, C] and permutes it itself, as models ported from Keras do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 6 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.where(self.bn(self.conv(x.permute(0, 3, 1, 2))) >= 0, 1.0, -1.0)
        return self.fc(h.flatten(1))


class TwoByName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb, self.h1, self.h2 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(32, 3), nn.Linear(32, 2)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.cat([(self.fa(left) >= 0).float(), (self.fb(right) >= 0).float()], dim=1)
        return {"scores": self.h1(z), "aux": self.h2(z)}


def _export(model: nn.Module, examples: tuple[torch.Tensor, ...], tmp_path) -> htaf_export.ExportResult:
    path = tmp_path / "m.pt2"
    program = torch.export.export(model.eval(), examples, dynamic_shapes=tuple({0: torch.export.Dim("b")}
                                                                                for _ in examples))
    torch.export.save(program, path)
    with contextlib.redirect_stdout(io.StringIO()):
        return htaf_export.export(path, "tflite-float", tmp_path / "m.tflite", device="cpu")


def _runner(path):
    import tensorflow as tf

    return tf.lite.Interpreter(str(path)).get_signature_runner()


def test_a_channels_last_model_takes_its_own_tensor(tmp_path):
    torch.manual_seed(0)
    model, x = ChannelsLast().eval(), torch.randn(16, 6, 5, 3)
    result = _export(model, (x[:2],), tmp_path)
    assert result.report.passed and not any("channels last" in n for n in result.conversion.notes)
    got = np.concatenate([_runner(result.artifact)(input=x[i:i + 1].numpy())["logits"] for i in range(16)])
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5)


def test_an_image_input_is_said_to_be_channels_last(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), htaf_export.nn.HTAF(), nn.Flatten(),
                          nn.Linear(4 * 3 * 5, 2)).eval()
    result = _export(model, (torch.randn(2, 2, 5, 7),), tmp_path)
    assert any("is channels last: [1, 5, 7, 2]" in n for n in result.conversion.notes), result.conversion.notes
    assert cli.main(["inspect", str(result.artifact)]) == 0
    assert "channels last" in capsys.readouterr().out


def test_an_image_output_is_said_to_be_channels_last_and_is_so(tmp_path, capsys):
    """A map out (segmentation-like): the file gives it channels last, and the note says how to read it."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), htaf_export.nn.HTAF(),
                          nn.Conv2d(4, 3, 3)).eval()
    x = torch.randn(2, 2, 5, 7)
    result = _export(model, (x,), tmp_path)
    assert any("output 'logits' is channels last: [N, 3, 5, 3]" in n and "y.transpose(0, 3, 1, 2)" in n
               for n in result.conversion.notes), result.conversion.notes
    got = _runner(result.artifact)(input=x[:1].permute(0, 2, 3, 1).numpy())["logits"]
    want = result.hardening.model(x[:1]).detach().numpy()  # the hardened model: exact steps
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, atol=1e-4)
    assert cli.main(["inspect", str(result.artifact)]) == 0
    out = capsys.readouterr().out
    assert "file output" in out and "[batch, 3, 5, 3]" in out, out


def test_several_inputs_and_outputs_carry_the_models_names(tmp_path):
    torch.manual_seed(1)
    model, left, right = TwoByName().eval(), torch.randn(4, 8), torch.randn(4, 8)
    result = _export(model, (left[:2], right[:2]), tmp_path)
    runner = _runner(result.artifact)
    got = runner(left=left[:1].numpy(), right=right[:1].numpy())
    want = model(left[:1], right[:1])
    assert set(got) == {"scores", "aux"}
    for name in ("scores", "aux"):
        np.testing.assert_allclose(got[name], want[name].detach().numpy(), atol=1e-5)
    assert any("get_signature_runner" in n for n in result.conversion.notes)
