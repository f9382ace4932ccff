"""A sign written as users write it, where(x >= 0, ones_like(x), -ones_like(x)) inside an autograd.Function,
with weights binarized the same way in forward: found as a step site in a .pt2 and in a pickled module,
exported to every target, its step tensors compared bit for bit, and a wrong model still caught."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from htaf_export import cli, outputs


class OnesLikeSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


class TinyVision(nn.Module):
    """An odd 11x13 two-channel image, plain layers, a binary conv whose weights are signed in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 16, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(16)
        self.mid = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.mid_bn = nn.BatchNorm2d(32)
        self.head = nn.Linear(32 * 5 * 6, 5)

    def forward(self, img):
        h = OnesLikeSign.apply(self.stem_bn(self.stem(img)))
        h = nn.functional.conv2d(h, OnesLikeSign.apply(self.mid.weight), None, padding=1)
        h = OnesLikeSign.apply(self.mid_bn(h))
        return self.head(nn.functional.max_pool2d(h, 2).flatten(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(5)
    model = TinyVision()
    for bn in (model.stem_bn, model.mid_bn):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    folder = tmp_path_factory.mktemp("handwritten")
    torch.export.save(torch.export.export(model, (torch.randn(2, 2, 11, 13),)), folder / "tiny.pt2")
    torch.save(model, folder / "tiny_pickle.pt")
    return folder, model


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tiny.pt2", "tiny_pickle.pt"])
@pytest.mark.parametrize("target", ["onnx", "tflite", "tflite-float"])
def test_ones_like_sign_is_a_step_on_every_target(saved, source, target, capsys):
    folder, _ = saved
    out = folder / f"{source.split('.')[0]}_{target}.{'onnx' if target == 'onnx' else 'tflite'}"
    report = folder / f"{source}_{target}.json"
    rc = cli.main([str(folder / source), "--target", target, "-o", str(out), "--input-shape", "2,11,13",
                   "--trust-pickle", "--device", "cpu", "--report", str(report)])
    capsys.readouterr()
    assert rc == 0
    data = json.loads(report.read_text())
    for backend in data["backends"]:
        steps = [t for t in backend["tensors"] if t["kind"] == "binary"]
        assert len(steps) == 2 and all(t["elements"] > 0 for t in steps), backend["backend"]
    assert not any("rounding bounds are not available" in n for n in data["notes"])


@pytest.mark.slow
def test_a_wrong_model_fails_at_its_step(saved, capsys, tmp_path):
    folder, model = saved
    artifact = tmp_path / "tiny.onnx"
    assert cli.main([str(folder / "tiny.pt2"), "--target", "onnx", "-o", str(artifact), "--no-validate"]) == 0
    with torch.no_grad():
        model.mid_bn.running_mean += 0.75  # the second step's threshold moves
    torch.export.save(torch.export.export(model, (torch.randn(2, 2, 11, 13),)), tmp_path / "moved.pt2")
    capsys.readouterr()
    rc = cli.main(["validate", str(tmp_path / "moved.pt2"), str(artifact), "--device", "cpu"])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 1 and "first failing tensor step@1" in out, out


class NewOnesSteps(nn.Module):
    """Steps whose branches are tensors the input makes: ``x.new_ones(())``, ``torch.zeros(())``, ``ones_like(h)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.where(self.fc1(x) > 0, x.new_ones(()), x.new_zeros(()))
        h = torch.where(self.fc2(h) >= 0, torch.ones(()), -torch.ones(()))
        h = torch.where(self.fc3(h) > 0, torch.ones_like(h), torch.zeros_like(h))  # filled like the layer's input
        return self.out(h)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_where_between_made_tensors_is_a_step_on_every_backend(fmt, tmp_path):
    """Was not found as a step (ONNX checked it through the logits only; TFLite refused 'Where with a constant
    condition or constant branches'); a TorchScript trace writes the branches as ConstantOfShape of ()."""
    import contextlib
    import io

    import htaf_export
    from conftest import save_pt2

    torch.manual_seed(0)
    model, x = NewOnesSteps().eval(), torch.rand(2, 64)
    if fmt == "pt2":
        path = save_pt2(model, x, tmp_path / "m.pt2")
    else:
        path = tmp_path / "m.ts"
        torch.jit.save(torch.jit.trace(model, x), str(path))
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite-float", tmp_path / "m.tflite", device="cpu", input_shape=[64])
    assert result.report.passed, result.report.failure_line()
    sites = sorted((s.levels, s.tie) for s in result.hardening.sites)  # a trace's steps are found at capture
    assert sites == ([("01", "gt"), ("pm1", "ge")] if fmt == "pt2" else []), result.hardening.sites
    steps = {t.name for b in result.report.backends for t in b.tensors if t.kind == "binary"}
    assert len(steps) == 3, steps


class PickledHeaviside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(10, 12), nn.Linear(12, 8)])
        self.head = nn.Linear(8, 3)
        self.register_buffer("one", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.heaviside(block(x), self.one)
        return self.head(x)


def test_heaviside_in_a_pickle_is_a_step_on_tflite(tmp_path, monkeypatch):
    """A pickle's torch.heaviside was left to its ONNX form (Where of comparisons), which TFLite refused as
    'Where with a constant condition or constant branches'; it is hardened through the traced program now."""
    import contextlib
    import io
    import sys

    import htaf_export

    module = type(sys)("user_heaviside")
    module.PickledHeaviside = PickledHeaviside
    monkeypatch.setattr(PickledHeaviside, "__module__", "user_heaviside")
    monkeypatch.setitem(sys.modules, "user_heaviside", module)
    torch.manual_seed(0)
    torch.save(PickledHeaviside().eval(), tmp_path / "h.pth")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(tmp_path / "h.pth", "tflite-float", tmp_path / "h.tflite", trust_pickle=True,
                                    input_shape=[10], device="cpu")
    assert result.report.passed, result.report.failure_line()
    assert [(s.levels, s.tie, s.how) for s in result.hardening.sites] == [
        ("01", "ge", "torch.heaviside in a traced graph")], result.hardening.sites


def test_a_tie_conflict_names_the_site_as_inspect_does(tmp_path, capsys):
    """At the root the module path is empty: the refusal said "site ''"."""
    from conftest import save_pt2
    from htaf_export import cli

    class RootStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.fc(x) >= 0).float()

    path = save_pt2(RootStep().eval(), torch.rand(2, 6), tmp_path / "root.pt2")
    rc = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "root.onnx"), "--tie", "gt"])
    err = capsys.readouterr().err
    assert rc == 2 and "site 'step' of the program steps with tie 'ge'" in err, err


class ScalarThresholds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 12), nn.Linear(12, 8), nn.Linear(8, 3)
        self.t1, self.t2 = nn.Parameter(torch.tensor(0.1)), nn.Parameter(torch.tensor(-0.05))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.fc1(x) >= self.t1).float()
        return self.fc3((self.fc2(h) > self.t2).float())


def test_a_traced_comparison_with_a_scalar_parameter_is_a_step(tmp_path):
    """The TorchScript exporter writes x >= t as LessOrEqual(t, x): no step was found, and TFLite refused
    "LessOrEqual other than of a tensor with a constant"."""
    import contextlib
    import io

    import htaf_export

    torch.manual_seed(0)
    path = tmp_path / "t.ts"
    torch.jit.save(torch.jit.trace(ScalarThresholds().eval(), torch.rand(2, 16)), str(path))
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "tflite-float", tmp_path / "t.tflite", input_shape=[16], device="cpu")
    assert result.report.passed, result.report.failure_line()
    steps = {t.name for b in result.report.backends for t in b.tensors if t.kind == "binary"}
    assert len(steps) == 2, steps


class BoolConcepts(nn.Module):
    """A concept bottleneck returning its concepts as the comparison's bool beside the logits made from them."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.bn, self.head = nn.Linear(20, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        active = self.bn(self.enc(x)) > 0
        return {"concepts": active, "logits": self.head(active.float())}


@pytest.mark.parametrize("fmt", ["pt2", "pickle"])
def test_a_step_whose_bool_is_also_returned_is_a_step(tmp_path, fmt):
    """Its comparison had two readers, so no step was found: no crafted inputs, outputs-only checks (and from a
    pickle, the file declared the default tie rule against the model's 'gt': a correct file failed)."""
    import contextlib
    import io

    import htaf_export
    from conftest import save_pt2

    torch.manual_seed(0)
    model = BoolConcepts()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    if fmt == "pt2":
        path = save_pt2(model.eval(), torch.rand(2, 20), tmp_path / "cbm.pt2")
    else:
        torch.save(model.eval(), path := tmp_path / "cbm.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "onnx", tmp_path / "cbm.onnx", device="cpu", input_shape=[20],
                                    trust_pickle=True)
    assert result.report.passed, result.report.failure_line()
    assert [(s.levels, s.tie) for s in result.hardening.sites] == [("01", "gt")], result.hardening.sites
    assert result.report.crafted["samples"] > 0, result.report.crafted
    compared = {t.name for b in result.report.backends for t in b.tensors}
    assert "concepts" in compared, compared


def test_a_bool_read_before_the_cast_and_an_alpha_add_stay_exact():
    """The step's bool, read by a node before the cast, must come after the step (was 'used before it has been
    defined'); torch.add(y, (s − y).detach(), alpha=0.5) is 0.5·(y + s), no straight-through estimator."""
    from htaf_export.harden_traced import export_batched, harden_graph_module

    class BoolFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l, self.h = nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            c = self.l(x) > 0
            return self.h(c.float()), c.sum(1)

    class HalfAdd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(6, 5)

        def forward(self, x):
            h = self.l(x)
            y, s = torch.tanh(h), (h >= 0).float()
            return torch.add(y, (s - y).detach(), alpha=0.5)

    torch.manual_seed(0)
    x = torch.randn(9, 6)
    for model in (BoolFirst().eval(), HalfAdd().eval()):
        program = export_batched(model, [[6]])
        hard, found = harden_graph_module(program, None)
        assert len(found) == 1
        for want, got in zip(outputs.leaves(model(x)), outputs.leaves(hard(x))):
            assert torch.equal(want, got)


class AnnealedHTAF(nn.Module):
    """A hand-written HTAF whose temperature α is annealed in training, so the user keeps it in a buffer (or a
    parameter) rather than a Python float."""

    def __init__(self, as_parameter: bool) -> None:
        super().__init__()
        alpha = torch.tensor(11.0)
        if as_parameter:
            self.alpha = nn.Parameter(alpha, requires_grad=False)
        else:
            self.register_buffer("alpha", alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.alpha * x + 4.0 * torch.tanh(x))


class AnnealedNet(nn.Module):
    def __init__(self, as_parameter: bool) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(20, 16), AnnealedHTAF(as_parameter), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("as_parameter", [False, True])
def test_an_htaf_whose_temperature_is_a_buffer_or_parameter_is_hardened(tmp_path, as_parameter, capsys):
    """It was left smooth, and its file 'passed' against a model that was not hardened either (the argmax of the
    hardened model agreed on 73 % of inputs). TorchScript cannot rewrite it: refused, not left smooth."""
    import contextlib
    import io

    import htaf_export

    from conftest import save_pt2

    torch.manual_seed(0)
    model = AnnealedNet(as_parameter).eval()
    path = save_pt2(model, torch.randn(2, 20), tmp_path / "annealed.pt2")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(path, "onnx", tmp_path / "annealed.onnx", device="cpu")
    assert result.report.passed, result.report.failure_line()
    assert [s.name for s in result.hardening.sites] == ["act.step"], result.hardening.sites
    x = torch.randn(64, 20)
    hard = model.fc2((model.fc1(x) >= 0).float())  # the step the HTAF stands for
    assert torch.allclose(result.hardening.model(x), hard, atol=1e-5)

    traced = tmp_path / "annealed.ts"
    torch.jit.save(torch.jit.trace(model, torch.randn(2, 20)), str(traced))
    assert cli.main([str(traced), "--target", "onnx", "--input-shape", "20", "-o", str(tmp_path / "t.onnx")]) == 2
    err = capsys.readouterr().err
    assert "would stay smooth" in err and ".pt2" in err and err.count("\n") == 1, err
