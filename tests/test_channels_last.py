"""onnx-int8 keeps residual streams channels-last between im2col products: fewer transposes, same parity."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import onnx
import torch
import torch.nn.functional as F
from torch import nn

import htaf_export
from htaf_export import cli
from htaf_export import metadata as md
from htaf_export.nn import HTAF

SHAPE = (3, 7, 5)  # not square: a step tensor decoded in the wrong layout cannot pass


class TwoBlockNet(nn.Module):
    """A user's Bi-Real-style net: float stem, two residual blocks (sign → ±1 conv → batch norm, + shortcut),
    mean over the map, a float head. Module names are the user's own."""

    def __init__(self) -> None:
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12))
        self.kernels = nn.ParameterList([nn.Parameter(torch.randn(12, 12, 3, 3)) for _ in range(2)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(12) for _ in range(2)])
        self.signs = nn.ModuleList([HTAF(levels="pm1") for _ in range(2)])
        self.out = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.entry(x)
        for sign, kernel, norm in zip(self.signs, self.kernels, self.norms):
            w = torch.sign(kernel) + (kernel == 0).float()
            h = norm(F.conv2d(sign(h), w, padding=1)) + h
        return self.out(h.mean(dim=(2, 3)))


def _saved(tmp_path) -> tuple:
    torch.manual_seed(5)
    model = TwoBlockNet()
    g = torch.Generator().manual_seed(6)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(12, generator=g))
            m.running_var.copy_(torch.rand(12, generator=g) * 3 + 0.5)
    model.eval()
    path = tmp_path / "two_block.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (torch.randn(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def test_residual_steps_are_stored_channels_last_and_still_match(tmp_path):
    path = _saved(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "onnx-int8", tmp_path / "m.int8.onnx", device="cpu")
    assert result.report is not None and result.report.passed, result.report.failure_line()
    proto = onnx.load(str(result.artifact))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulInteger") == 2
    # unconverted, each im2col product would sit between two transposes (4); here one enters the stream
    # after the stem and the second step's stream leaves it once for the mean
    assert ops.count("Transpose") <= 3, ops
    stored = json.loads({p.key: p.value for p in proto.metadata_props}[md.CHANNELS_LAST_STEPS])
    assert stored, "the second block's step reads the channels-last stream"
    steps = {t.name: t for t in result.report.backends[0].tensors if t.kind == "binary"}
    assert set(stored) <= set(steps)
    assert all(steps[s].elements > 0 and steps[s].elements % (12 * 7 * 5) == 0 for s in stored)


def test_a_wrong_weight_behind_a_channels_last_step_names_that_step(tmp_path, capsys):
    path = _saved(tmp_path)
    good = tmp_path / "good.int8.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        htaf_export.export(path, "onnx-int8", good, device="cpu", validate_artifact=False)
    proto = onnx.load(str(good))
    producers = {o: n for n in proto.graph.node for o in n.output}
    name = next(n for n in proto.graph.node if n.op_type == "MatMulInteger").input[1]
    while not name.endswith(".packed"):  # follow the unpacking at session start back to the packed bits
        name = next(i for i in producers[name].input if i.endswith(".packed") or i in producers)
    first = next(i for i in proto.graph.initializer if i.name == name)
    raw = bytearray(first.raw_data)
    raw[:4] = bytes(b ^ 0xFF for b in raw[:4])  # 32 weights of the first block's conv change sign
    first.raw_data = bytes(raw)
    bad = tmp_path / "bad.int8.onnx"
    onnx.save(proto, str(bad))
    capsys.readouterr()
    code = cli.main(["validate", str(path), str(bad), "--device", "cpu"])
    out = capsys.readouterr().out.replace("\n", " ")
    assert code == 1, out
    assert "first failing tensor" in out and "signs.1" in out, out
