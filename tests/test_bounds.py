"""Derived tolerances: the rounding bounds hold against a float64 evaluation, are tight enough to catch a
batch-norm statistic nudged by 1e-3, and the fixed tolerances still override them."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import htaf_export
from htaf_export import bounds, cli
from htaf_export.harden import harden
from htaf_export.nn import HTAF, BinaryLinear
from htaf_export.pipeline import export
from htaf_export.reference import run_reference

from gallery.models import REGISTRY, build

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def evaluations(model: torch.nn.Module, x: torch.Tensor, names: list[str]):
    """The reference in float32 and the same model in float64 (as good as exact, next to float32)."""
    ref32 = run_reference(model, (x,), names)
    ref64 = run_reference(copy.deepcopy(model).double(), (x.double(),), names)
    return ref32, ref64


def agreeing_rows(ref32, ref64) -> np.ndarray:
    """Samples whose every step decision is the same in both precisions (elsewhere the paths part)."""
    rows = np.ones(len(next(iter(ref32.outputs.values()))), bool)
    for key, bits in ref32.steps.items():
        rows &= (bits.reshape(len(rows), -1) == ref64.steps[key].reshape(len(rows), -1)).all(axis=1)
    return rows


def output_bounds_hold(model: torch.nn.Module, x: torch.Tensor, min_rows: int) -> np.ndarray:
    """The output bounds of ``model`` (hardened) on ``x``, after checking that they cover the float64 evaluation
    on at least ``min_rows`` rows whose step decisions agree in both precisions."""
    program = bounds.traced_program(model, [list(x.shape[1:])])
    outs, _ = bounds.batch_bounds(program, (x,), ["out"])
    ref32, ref64 = evaluations(model, x, ["out"])
    rows = agreeing_rows(ref32, ref64)
    gap = np.abs(ref32.outputs["out"].astype(np.float64) - ref64.outputs["out"])
    assert rows.sum() >= min_rows and (gap[rows] <= outs["out"][rows]).all()
    return outs["out"]


@pytest.mark.parametrize("name", ["bnn_mlp", "bnn_cnn", "dhn_mlp", "icbm_cnn", "bireal_style", "icbm_dict"])
def test_bounds_cover_the_float64_evaluation(name):
    if name in REGISTRY:  # user-style models: plain torch layers, float residual paths, dict outputs
        model, shape = harden(build(name, trained=False)).model, list(REGISTRY[name][1][0])
    else:
        loaded = htaf_export.load(SAMPLES / f"{name}.pt")
        model, shape = harden(loaded.module).model, list(loaded.input_shape)
    torch.manual_seed(0)
    x = torch.randn(48, *shape)
    program = bounds.traced_program(model, [shape])
    assert program is not None
    names = ["logits", "concepts"] if name == "icbm_dict" else ["out"]
    out_bounds, step_bounds = bounds.batch_bounds(program, (x,), names)
    ref32, ref64 = evaluations(model, x, names)
    rows = agreeing_rows(ref32, ref64)
    assert rows.sum() >= 40
    for key, e in step_bounds.items():
        gap = np.abs(ref32.preactivations[key].astype(np.float64) - ref64.preactivations[key])
        assert (gap[rows] <= e[rows]).all(), key
    for out in names:
        gap = np.abs(ref32.outputs[out].astype(np.float64) - ref64.outputs[out])
        e = out_bounds[out]
        assert (gap[rows] <= e[rows]).all(), out
        # and not vacuous: far below the values themselves (a computed scaled-sign weight, as in
        # bireal_style, carries its rounding into every product: ~2e-4 there, worst case)
        assert e.max() <= 1e-3 * max(1.0, float(np.abs(ref64.outputs[out]).max())), out


def test_one_dimensional_pools_have_rules():
    """A keyword-spotting shape (Conv1d, AvgPool1d, AdaptiveAvgPool1d, MaxPool1d): bounded, and the bounds hold."""
    nn = torch.nn
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(13, 24, 3), nn.BatchNorm1d(24), HTAF(levels="pm1"), nn.AvgPool1d(2),
                          nn.Conv1d(24, 20, 3), nn.MaxPool1d(2), HTAF(levels="01"), nn.AdaptiveAvgPool1d(1),
                          nn.Flatten(), nn.Linear(20, 7))
    bound = output_bounds_hold(harden(model).model.eval(), torch.randn(32, 13, 37), min_rows=0)
    assert 0 < bound.max() <= 1e-4


def test_eval_dropout_and_leaky_relu_have_rules():
    """Common float layers of users' heads: an eval-mode Dropout (the identity) and LeakyReLU keep the derived
    bounds on (without rules the whole model fell back to fixed tolerances), and the bounds hold."""
    nn = torch.nn
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 16), nn.LeakyReLU(0.2), nn.Dropout(0.3), nn.Linear(16, 12),
                          HTAF(levels="01"), nn.Linear(12, 5)).eval()
    bound = output_bounds_hold(harden(model).model.eval(), torch.randn(64, 20), min_rows=48)
    assert 0 < bound.max() <= 1e-4


class InPlaceHead(torch.nn.Module):
    """BinaryNet-style code: Hardtanh(inplace=True), Dropout2d, and ``out +=`` on the result."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Hardtanh(inplace=True),
                                      nn.Dropout2d(0.2), HTAF(levels="pm1"), nn.Conv2d(6, 4, 3))
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        out = self.fc(torch.relu_(self.features(x)).flatten(1))
        out += 0.25
        return out


def test_in_place_ops_and_channel_dropout_have_rules():
    """An in-place op is bounded as its out-of-place twin, and its input reads the result afterwards; an eval
    Dropout2d is the identity. Without them the model fell back to fixed tolerances (a false FAIL on deep ones)."""
    torch.manual_seed(4)
    bound = output_bounds_hold(harden(InPlaceHead()).model.eval(), torch.randn(48, 2, 6, 6), min_rows=32)
    assert 0 < bound.max() <= 1e-4


class BinaryAttention(torch.nn.Module):
    """Attention over binary queries and keys: two computed operands in each product, a softmax between."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.q, self.k, self.v, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(40, 3)
        self.sq, self.sk = HTAF(levels="pm1"), HTAF(levels="pm1")

    def forward(self, x):
        scores = self.sq(self.q(x)) @ self.sk(self.k(x)).transpose(1, 2) / 8 ** 0.5
        return self.out((torch.softmax(scores, dim=-1) @ self.v(x)).flatten(1))


def test_an_in_place_op_on_a_view_has_no_bound():
    """``out[:, 0] += b`` mutates ``out`` through a view: bounding the view alone would leave ``out`` stale."""
    class ViewUpdate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.step, self.head = torch.nn.Linear(6, 4), HTAF(levels="pm1"), torch.nn.Linear(4, 2)

        def forward(self, x):
            out = self.head(self.step(self.fc(x)))
            out[:, 0] += 0.3
            return out

    program = bounds.traced_program(harden(ViewUpdate()).model.eval(), [[6]])
    with pytest.raises(bounds.NoBound, match="on a view"):
        bounds.batch_bounds(program, (torch.randn(4, 6),), ["out"])


def test_products_of_computed_tensors_and_softmax_have_rules():
    torch.manual_seed(5)
    bound = output_bounds_hold(harden(BinaryAttention()).model.eval(), torch.randn(48, 5, 6), min_rows=32)
    assert 0 < bound.max() <= 1e-4


def test_bilinear_resizing_has_a_rule():
    """Half pixels and aligned corners, up and down: the bounds hold against float64 and stay small."""
    nn, F = torch.nn, torch.nn.functional

    class Resized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.step, self.head = nn.Conv2d(2, 3, 3), HTAF(levels="pm1"), nn.Linear(3 * 13 * 11 + 3 * 3 * 2, 4)

        def forward(self, x):
            h = self.step(self.conv(x))
            up = F.interpolate(h, size=(13, 11), mode="bilinear", align_corners=False)
            down = F.interpolate(h * 0.37, size=(3, 2), mode="bilinear", align_corners=True)
            return self.head(torch.cat([up.flatten(1), down.flatten(1)], 1))

    torch.manual_seed(8)
    bound = output_bounds_hold(harden(Resized()).model.eval(), torch.randn(48, 2, 7, 6), min_rows=32)
    assert 0 < bound.max() <= 5e-4  # mostly the 435-term head's own rounding


def test_binary_layer_sums_are_exact():
    """±1 inputs times ±1 weights sum to integers, in any order: no rounding allowance at all there, so a
    threshold or weight moved by one integer step cannot hide in it."""
    model = harden(torch.nn.Sequential(HTAF(levels="pm1"), BinaryLinear(24, 8), HTAF(levels="pm1"),
                                       torch.nn.Linear(8, 3))).model.eval()
    program = bounds.traced_program(model, [[24]])
    outs, steps = bounds.batch_bounds(program, (torch.randn(16, 24),), ["out"])
    first, second = sorted(steps)
    assert (steps[first] == 0).all()  # the raw input is exact
    assert (steps[second] == 0).all()  # the binary layer's integer sum
    assert (outs["out"] > 0).all()  # the float head rounds


@pytest.fixture(scope="module")
def nudged(tmp_path_factory):
    """bnn_cnn exported, and a copy of the model whose output batch norm has one running mean nudged by
    1e-3: the artifact no longer matches it. (Before a step, on digits, the same nudge changes nothing:
    the sums there are multiples of 1/16 and no integer lattice point lies in the 1e-3 it moves.)"""
    out = tmp_path_factory.mktemp("nudged")
    artifact = export(SAMPLES / "bnn_cnn.pt", "onnx", out / "bnn_cnn.onnx", device="cpu").artifact
    loaded = htaf_export.load(SAMPLES / "bnn_cnn.pt")
    loaded.module.layers.bn_out.running_mean[7] += 1e-3
    model = htaf_export.save(loaded.module, out / "nudged.pt")
    return model, artifact


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, " ".join(capsys.readouterr().out.split())


def test_batch_norm_statistic_nudged_by_1e3_fails_and_names_the_layer(nudged, capsys):
    model, artifact = nudged
    code, out = run_cli(capsys, "validate", model, artifact, "--device", "cpu")
    assert code == 1 and "first failing tensor logits:" in out and "values beyond tolerance" in out, out


def test_fixed_tolerances_override_the_derived_ones(nudged, capsys):
    """--flip-margin wide enough to explain the nudge: the user's override is what decides."""
    model, artifact = nudged
    code, out = run_cli(capsys, "validate", model, artifact, "--device", "cpu", "--flip-margin", "0.01",
                        "--atol", "1")
    assert code == 0, out


def test_a_model_without_rules_reports_the_fixed_tolerances_it_used(tmp_path):
    nn = torch.nn
    torch.manual_seed(3)
    class Erf(nn.Module):  # an op with no rounding rule (GELU, ELU, … have theirs)
        def forward(self, x):
            return torch.erf(x)

    model = nn.Sequential(nn.Linear(10, 8), Erf(), nn.Linear(8, 6), HTAF(levels="01"), nn.Linear(6, 3)).eval()
    path = htaf_export.save(model, tmp_path / "erf.pt2", input_shape=[10])
    report = export(path, "onnx", tmp_path / "erf.onnx", device="cpu").report
    assert report.passed and any("no rounding rule" in n for n in report.notes), report.notes
    assert report.tolerance.derived is False


def test_a_per_layer_xnor_scale_has_a_rule():
    """w.sign() * w.abs().mean() (one scale for the whole layer): the mean of every element has a rule, and the
    bounds of the scaled product hold against float64."""
    nn = torch.nn

    class Xnor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(12, 20))
            self.step, self.head = HTAF(levels="pm1"), nn.Linear(12, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.w.sign() * self.w.abs().mean()
            return self.head(self.step(x @ w.t()))

    torch.manual_seed(4)
    output_bounds_hold(harden(Xnor().eval()).model.eval(), torch.randn(64, 20), min_rows=48)


def test_a_global_max_pool_has_a_rule():
    """nn.AdaptiveMaxPool2d returns (values, indices): the rule pools the error the same way, and the bounds hold."""
    nn = torch.nn
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), HTAF(levels="pm1"),
                          nn.Conv2d(6, 8, 3), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    bound = output_bounds_hold(harden(model).model.eval(), torch.randn(48, 2, 7, 9), min_rows=40)
    assert 0 < bound.max() <= 1e-4


class _Offset(torch.nn.Module):
    """Adds a large constant: a layer norm's rows then have |mean| far above their spread (E[x²] − μ² cancels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 40.0


def test_layer_norm_and_a_plain_sign_have_rules(tmp_path):
    """A token model's LayerNorm (also over rows whose mean dwarfs their spread, where ONNX Runtime's one-pass
    variance cancels) and torch.sign on a computed tensor keep the derived bounds on; they hold against float64,
    and the ONNX file passes on them."""
    nn = torch.nn

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.shift, self.norm = nn.Linear(12, 32), _Offset(), nn.LayerNorm(32)
            self.mix, self.step, self.head = nn.Linear(32, 16), HTAF(levels="pm1"), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.sign(self.mix(self.norm(self.shift(self.embed(x)))))
            return self.head(self.step(h + 0.5)).mean(1)

    torch.manual_seed(6)
    model = harden(Tagger().eval()).model.eval()
    bound = output_bounds_hold(model, torch.randn(48, 7, 12), min_rows=40)
    assert 0 < bound.max() <= 1e-3
    path = htaf_export.save(Tagger().eval(), tmp_path / "tagger.pt2", input_shape=[7, 12])
    report = export(path, "onnx", tmp_path / "tagger.onnx", device="cpu").report
    assert report.passed and report.tolerance.derived, report.notes
    assert not any("rounding bounds are not available" in n for n in report.notes), report.notes


@pytest.mark.parametrize("act", [torch.nn.GELU(), torch.nn.GELU(approximate="tanh"), torch.nn.ELU(0.5), torch.nn.ELU(10.0),
                                 torch.nn.SELU(), torch.nn.CELU(0.7), torch.nn.CELU(10.0), torch.nn.Softplus(), torch.nn.Hardsigmoid(),
                                 torch.nn.Hardswish(), torch.nn.Mish(), torch.nn.SiLU()],
                         ids=lambda m: repr(m))
def test_smooth_activations_have_rules_whose_bounds_hold(act):
    """Each activation's rule (Lipschitz constant times the input's error, plus a few roundings) holds against
    float64 through a layer before and after it."""
    nn = torch.nn
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 16), act, nn.Linear(16, 5)).eval()
    bound = output_bounds_hold(harden(model).model.eval(), torch.randn(64, 12) * 3, min_rows=48)
    assert 0 < bound.max() <= 1e-3  # α = 10 scales the errors of what it reads tenfold


class _Decides(torch.nn.Module):
    """Returns a comparison of two computed tensors (not a step: neither side is a constant) and a where on it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.step, self.head = torch.nn.Linear(6, 8), HTAF(levels="pm1"), torch.nn.Linear(8, 4)
        with torch.no_grad():  # head row 1 is row 0 reversed; scores 2 and 3 far apart
            self.head.weight[1] = self.head.weight[0].flip(0)
            self.head.bias[1] = self.head.bias[0]
            self.head.weight[3] = self.head.weight[2] + 5

    def forward(self, x):
        u = self.step(self.fc(x)) * 0.1 + x[:, :1]
        s, t = self.head(u), self.head(u.flip(1))  # t[:, 1] sums s[:, 0]'s terms in the other order
        near, far = s[:, 0] > t[:, 1], s[:, 2] < s[:, 3]
        return near, far, torch.where(near & far, s[:, 0], -t[:, 1])


def test_a_returned_comparison_is_uncertain_only_within_its_operands_bounds():
    """Scores equal in exact arithmetic but summed in another order may compare either way: the decision's bound
    is 1 (a runtime deciding the other way is a correct implementation); far-apart scores keep bound 0, so a
    flipped decision there still fails. ``where`` on an uncertain decision covers both sides."""
    torch.manual_seed(3)
    model = harden(_Decides().eval()).model.eval()
    x = torch.randn(64, 6)
    program = bounds.traced_program(model, [[6]])
    outs, _ = bounds.batch_bounds(program, (x,), ["near", "far", "picked"])
    assert (outs["near"] > 0).mean() > 0.9 and (outs["far"] == 0).all()
    with torch.no_grad():
        s = model.head(model.step(model.fc(x)) * 0.1 + x[:, :1])
    assert (outs["picked"] >= 2 * s[:, 0].abs().numpy() - 1e-6).all()  # either side may be picked
