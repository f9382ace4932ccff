"""A .pt2 program exported at one batch size: freed of its guard when each sample's result stands alone,
including snnTorch's membrane buffer kept from a run before export, and refused in one line otherwise."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from htaf_export import cli


def _atan(x):
    """snnTorch's arctan surrogate as a module-level function: its default is a closure, which does not pickle."""
    import snntorch as snn

    return snn.surrogate.ATan.apply(x, 2.0)


class WarmLeaky(nn.Module):
    """snnTorch's default (subtract reset) neurons; ``init_leaky`` zeroes the membrane in its last shape."""

    def __init__(self) -> None:
        import snntorch as snn

        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 9), nn.Linear(9, 3)
        self.lif1, self.lif2 = snn.Leaky(beta=0.9, spike_grad=_atan), snn.Leaky(beta=0.7, spike_grad=_atan)

    def forward(self, x):
        m1, m2, count = self.lif1.init_leaky(), self.lif2.init_leaky(), 0
        for _ in range(3):
            s1, m1 = self.lif1(self.fc1(x), m1)
            s2, m2 = self.lif2(self.fc2(s1), m2)
            count = count + s2
        return count


class KeptState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.register_buffer("carry", torch.linspace(-1, 1, 24).reshape(4, 6))

    def forward(self, x):
        return (self.fc(x + self.carry) > 0).float()


class FoldedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        return (self.fc(x.reshape(1, 24)) > 0).float().expand(4, 4)


class SizedByItsInput(nn.Module):
    """A hand-written LIF loop whose state is ``torch.zeros(x.shape[0], ...)`` and whose readout flattens with
    ``view(x.shape[0], -1)``: exported without a dynamic batch, the trace writes both sizes as the literal 4."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        v, total = torch.zeros(x.shape[0], 2, 4), 0
        drive = self.fc1(x).view(x.shape[0], 2, 4)
        for _ in range(3):
            v = 0.5 * v + drive
            s = (v >= 0.25).float()
            v = v * (1 - s)
            total = total + self.fc2(s.view(x.shape[0], -1))
        return total


class OneSampleView(nn.Module):
    """Written for one sample at a time: ``h.view(1, -1)`` before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = (self.fc1(x).view(1, 2, 4) >= 0).float()
        return self.fc2(h.view(1, -1))


def _export(model: nn.Module, tmp_path, capfd, batch: int = 4) -> tuple[int, str]:
    path = tmp_path / "model.pt2"
    features = model.fc1.in_features if hasattr(model, "fc1") else 6
    torch.export.save(torch.export.export(model.eval(), (torch.rand(batch, features),)), path)
    capfd.readouterr()
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "model.onnx"), "--device", "cpu"])
    return rc, capfd.readouterr().err


def test_snntorch_membrane_kept_from_a_test_run_is_sized_to_each_batch(tmp_path, capfd):
    pytest.importorskip("snntorch")
    torch.manual_seed(0)
    model = WarmLeaky().eval()
    model(torch.rand(4, 12))  # the user's check before saving leaves lif.mem at [4, 9]
    assert model.lif1.mem.shape == (4, 9)
    rc, err = _export(model, tmp_path, capfd)
    assert rc == 0, err
    assert (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("model, batch", [(SizedByItsInput, 4), (OneSampleView, 1)])
def test_sizes_the_trace_wrote_as_the_batch_are_read_from_the_input(model, batch, tmp_path, capfd):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = model().eval()
    rc, err = _export(model, tmp_path, capfd, batch)
    assert rc == 0, err
    x = torch.randn(3, 6)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    alone = torch.cat([model(x[i:i + 1]) for i in range(3)]).detach().numpy()  # the model itself runs one at a time
    np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, named", [(KeptState, "'carry' holds a state of that batch"),
                                          (FoldedBatch, "dynamic_shapes")])
def test_a_program_bound_to_its_batch_is_refused_with_the_reason(model, named, tmp_path, capfd):
    rc, err = _export(model(), tmp_path, capfd)
    assert rc == 2 and "exported for batch size 4 only" in err and named in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "model.onnx").exists()


def test_a_pickled_snntorch_model_is_not_left_at_the_batch_of_our_probes(tmp_path, monkeypatch):
    """resolve and harden run the model at batch 2; snnTorch kept that membrane in ``lif.mem`` and the
    traced ONNX file then took batch 2 only (an internal error at validation)."""
    pytest.importorskip("snntorch")
    import htaf_export

    module = type(sys)("user_snn")
    module.WarmLeaky = WarmLeaky
    monkeypatch.setattr(WarmLeaky, "__module__", "user_snn")
    monkeypatch.setitem(sys.modules, "user_snn", module)
    torch.manual_seed(0)
    path = tmp_path / "fresh.pth"
    torch.save(WarmLeaky().eval(), path)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).random((7, 12), dtype=np.float32) * 3)
    result = htaf_export.export(path, "onnx", tmp_path / "m.onnx", data=tmp_path / "x.npz", trust_pickle=True,
                                device="cpu")
    assert result.report.passed, result.report.failure_line()


class ZeroThreshold(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.register_buffer("t", torch.zeros(1))  # read by value: a constant, whatever its size

    def forward(self, x):
        return (self.fc(x) > self.t).float()


def test_a_constant_buffer_the_size_of_the_batch_is_kept(tmp_path, capfd):
    """Exported at batch 1, a [1] threshold buffer has the batch's size: it is a constant, not a state."""
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(ZeroThreshold().eval(), (torch.rand(1, 6),)), path)
    capfd.readouterr()
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "model.onnx"), "--device", "cpu"])
    assert rc == 0, capfd.readouterr().err
