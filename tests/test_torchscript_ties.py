"""A TorchScript model's steps come from its captured graph (it exposes no intermediate tensors): where the model
and the graph decide a near tie differently, the model's outputs are not the graph steps' consequence. Such
samples are spared from the output comparison, and only they: an output that differs without a near tie fails."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import htaf_export
from htaf_export.parity import Tolerance
from htaf_export.reference import unsure_rows


def test_unsure_rows_need_both_a_difference_and_a_near_tie():
    captured = {"y": np.zeros((4, 3), np.float32)}
    ours = {"y": np.array([[0, 0, 0], [0.5, 0, 0], [0.5, 0, 0], [0, 0, 0]], np.float32)}
    pre = np.array([[1.0, -2.0], [1.0, 3e-5], [1.0, -2.0], [0.0, 1.0]], np.float32)
    got = unsure_rows(ours, captured, [pre], Tolerance())
    # row 1 differs with a near tie: spared; row 2 differs with none: compared (and fails); row 3 has a tie only
    assert got.tolist() == [False, True, False, False]
    assert unsure_rows(ours, captured, [pre], Tolerance(flip_margin=1e-6)).tolist() == [False] * 4


class Resampler(nn.Module):
    """A step, then nearest resampling by a scale and to a size (odd input sides), two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = (self.bn(self.c1(x)) >= 0).float()
        half = F.interpolate(h, scale_factor=0.5, mode="nearest")
        return self.c2(half).mean((2, 3)), F.interpolate(self.c2(h), size=(5, 5), mode="nearest")


def test_torchscript_resampler_passes_on_onnx(tmp_path):
    torch.manual_seed(0)
    model = Resampler().eval()
    path = tmp_path / "resampler.pt"
    torch.jit.save(torch.jit.script(model), path)
    result = htaf_export.export(path, "onnx", tmp_path / "r.onnx", input_shape=[3, 15, 15])
    report = result.report
    assert report.passed, report.failure_line()
    assert [r.layer for r in result.conversion.rows] == ["step"]  # a step in the root's forward, as pt2 names it
    floats = [t for t in report.backends[0].tensors if t.kind != "binary"]
    assert len(floats) == 2 and all(t.elements > 0 for t in floats)  # both outputs compared, not all spared


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.where(x >= 0, 1.0, -1.0) - x).detach()


class LarqStyle(nn.Module):
    """A larq-style BNN written by hand: binary convs and denses (signs of inputs and weights), batch norms."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.d1, self.b2 = nn.Linear(16 * 6 * 6, 32, bias=False), nn.BatchNorm1d(32)
        self.d2, self.b3 = nn.Linear(32, 10, bias=False), nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b0(self.c0(x))
        x = F.max_pool2d(self.b1(F.conv2d(ste_sign(x), ste_sign(self.c1.weight), padding=1)), 2)
        x = self.b2(F.linear(ste_sign(x.flatten(1)), ste_sign(self.d1.weight)))
        return self.b3(F.linear(ste_sign(x), ste_sign(self.d2.weight)))


def _larq_style() -> nn.Module:
    torch.manual_seed(1)
    model = LarqStyle()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-3, 3), m.running_var.uniform_(0.5, 4), m.weight.data.uniform_(0.5, 2)
    return model.eval()


def test_torchscript_models_get_rounding_bounds(tmp_path):
    """Traced and scripted files are read as fx graphs (torch's converter): their outputs' rounding bounds exist
    and hold against ONNX Runtime on the exported file."""
    import onnxruntime as ort

    from htaf_export import bounds
    from htaf_export.harden import harden

    model, x = _larq_style(), torch.randn(64, 1, 12, 12)
    for kind, script in (("traced", torch.jit.trace(model, x[:1])), ("scripted", torch.jit.script(model))):
        path = tmp_path / f"{kind}.pt"
        torch.jit.save(script, path)
        result = htaf_export.export(path, "onnx", tmp_path / f"{kind}.onnx", input_shape=[1, 12, 12],
                                    validate_artifact=False)
        hardened = harden(htaf_export.load(path).module).model
        program = bounds.traced_program(hardened, [[1, 12, 12]])
        assert program is not None, kind
        outs, _ = bounds.batch_bounds(program, (x,), ["logits"])
        session = ort.InferenceSession(str(result.artifact), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            ref = hardened(x).numpy()
        assert (outs["logits"] > 0).all()
        assert (np.abs(ref - got) <= 2 * outs["logits"]).all(), kind
