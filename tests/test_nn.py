"""HTAF and Step math, binary layers, LIF neurons."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import htaf_export
from htaf_export.nn import HTAF, LIF, BinaryConv2d, BinaryLinear, Step, exact_step, htaf_derivative, htaf_function

PARAMS = [(2.0, 4.0), (1.0, 0.0), (0.5, 10.0), (30.0, 4.0)]
D = torch.float64


def _grid(lo=-20.0, hi=20.0, n=40001):
    return torch.linspace(lo, hi, n, dtype=D)


# --------------------------------------------------------------------------------------------- HTAF


@pytest.mark.parametrize("alpha,beta", PARAMS)
def test_htaf_is_half_at_zero_and_zero_for_pm1(alpha, beta):
    zero = torch.zeros(3, dtype=D)
    assert torch.equal(HTAF(alpha, beta)(zero), torch.full((3,), 0.5, dtype=D))
    assert torch.equal(HTAF(alpha, beta, levels="pm1")(zero), torch.zeros(3, dtype=D))
    # The threshold moves the midpoint: HTAF(θ) = 1/2.
    assert HTAF(alpha, beta, threshold=0.7)(torch.tensor([0.7], dtype=D)).item() == pytest.approx(0.5, abs=1e-12)
    assert HTAF(alpha, beta, threshold=0.7)(torch.tensor([0.0], dtype=D)).item() < 0.5


@pytest.mark.parametrize("alpha,beta", PARAMS)
@pytest.mark.parametrize("levels", ["01", "pm1"])
def test_htaf_monotone_increasing(alpha, beta, levels):
    x = _grid()
    y = HTAF(alpha, beta, levels=levels)(x)
    d = y[1:] - y[:-1]
    assert (d >= 0).all()
    # Strictly increasing wherever it has not saturated in float64 (|alpha x + beta tanh x| < 20).
    z = alpha * x + beta * torch.tanh(x)
    central = (z[1:].abs() < 20) & (z[:-1].abs() < 20)
    assert central.sum() > 100
    assert (d[central] > 0).all()


@pytest.mark.parametrize("alpha,beta", PARAMS)
def test_htaf_limits(alpha, beta):
    big = torch.tensor([-60.0, -40.0, 40.0, 60.0], dtype=D)
    y = HTAF(alpha, beta)(big)
    assert y[0] < 1e-12 and y[1] < 1e-8
    assert y[2] > 1 - 1e-8 and y[3] > 1 - 1e-12
    ypm = HTAF(alpha, beta, levels="pm1")(big)
    assert ypm[0] < -1 + 1e-8 and ypm[3] > 1 - 1e-8
    # Values stay inside the open/closed range of the levels everywhere.
    x = _grid()
    h = HTAF(alpha, beta)(x)
    assert (h >= 0).all() and (h <= 1).all()


@pytest.mark.parametrize("alpha,beta", PARAMS)
@pytest.mark.parametrize("threshold", [0.0, 0.8, -1.5])
@pytest.mark.parametrize("levels", ["01", "pm1"])
def test_autograd_gradient_equals_closed_form(alpha, beta, threshold, levels):
    x = torch.linspace(-6, 6, 241, dtype=D).requires_grad_(True)
    HTAF(alpha, beta, threshold=threshold, levels=levels)(x).sum().backward()
    expected = htaf_derivative(x.detach() - threshold, alpha, beta)
    if levels == "pm1":
        expected = 2 * expected
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("alpha,beta", PARAMS)
def test_closed_form_matches_finite_differences(alpha, beta):
    x = torch.linspace(-4, 4, 81, dtype=D)
    h = 1e-6
    fd = (htaf_function(x + h, alpha, beta) - htaf_function(x - h, alpha, beta)) / (2 * h)
    torch.testing.assert_close(htaf_derivative(x, alpha, beta), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("alpha,beta", PARAMS)
def test_slope_at_zero(alpha, beta):
    x = torch.zeros(1, dtype=D, requires_grad=True)
    HTAF(alpha, beta)(x).sum().backward()
    assert x.grad.item() == pytest.approx((alpha + beta) / 4, rel=1e-12)
    assert htaf_derivative(torch.zeros(1, dtype=D), alpha, beta).item() == pytest.approx((alpha + beta) / 4, rel=1e-12)
    h = 1e-7
    fd = (htaf_function(torch.tensor(h, dtype=D), alpha, beta) - htaf_function(torch.tensor(-h, dtype=D), alpha, beta)) / (2 * h)
    assert fd.item() == pytest.approx((alpha + beta) / 4, rel=1e-6)


@pytest.mark.parametrize("alpha,beta", [(2.0, 4.0), (1.0, 8.0), (0.5, 3.0)])
def test_tail_heavier_than_logistic_with_same_slope(alpha, beta):
    k = alpha + beta  # sigmoid(k x) has slope k/4 at 0, the same as HTAF's (alpha + beta)/4
    x0 = torch.zeros(1, dtype=D, requires_grad=True)
    torch.sigmoid(k * x0).sum().backward()
    assert x0.grad.item() == pytest.approx(htaf_derivative(torch.zeros(1, dtype=D), alpha, beta).item(), rel=1e-12)

    x = torch.linspace(3, 10, 71, dtype=D)
    htaf = HTAF(alpha, beta)
    # Upper tail 1 - f(x) and lower tail f(-x): HTAF's is larger on both sides.
    upper_h, upper_l = 1 - htaf(x), 1 - torch.sigmoid(k * x)
    lower_h, lower_l = htaf(-x), torch.sigmoid(-k * x)
    assert (upper_h > upper_l).all()
    assert (lower_h > lower_l).all()
    # ... and by orders of magnitude: the tails decay like exp(-alpha x), not exp(-(alpha+beta) x).
    assert (lower_h / lower_l > 100).all()
    decay = torch.log(lower_h[-1] / lower_h[-11]) / (x[-1] - x[-11])
    assert decay.item() == pytest.approx(-alpha, rel=1e-3)


# --------------------------------------------------------------------------------------------- Step


@pytest.mark.parametrize("alpha,beta", PARAMS)
@pytest.mark.parametrize("threshold", [0.0, 0.25, -1.0])
@pytest.mark.parametrize("levels", ["01", "pm1"])
@pytest.mark.parametrize("tie", ["ge", "gt"])
def test_hardening_is_exact(alpha, beta, threshold, levels, tie):
    # Pre-activations on both sides of the threshold, down to 1e-6 away (closer, HTAF itself rounds to 1/2).
    offsets = torch.cat([torch.logspace(-6, 1, 200, dtype=D), torch.linspace(0.01, 5, 200, dtype=D)])
    x = threshold + torch.cat([offsets, -offsets])
    smooth = HTAF(alpha, beta, threshold=threshold, levels=levels, tie=tie)
    step = smooth.hardened()
    assert isinstance(step, Step) and step.tie == tie and step.levels == levels and step.threshold == threshold
    fired = (htaf_function(x - threshold, alpha, beta) >= 0.5).to(D)
    expected = fired if levels == "01" else 2 * fired - 1
    assert torch.equal(step(x), expected)
    assert set(step(x).unique().tolist()) == ({0.0, 1.0} if levels == "01" else {-1.0, 1.0})


@pytest.mark.parametrize("threshold", [0.0, 0.3, -2.0])
def test_step_at_exactly_the_threshold(threshold):
    at = torch.full((4,), threshold)
    assert torch.equal(Step(threshold, "01", "ge")(at), torch.ones(4))
    assert torch.equal(Step(threshold, "01", "gt")(at), torch.zeros(4))
    assert torch.equal(Step(threshold, "pm1", "ge")(at), torch.ones(4))
    assert torch.equal(Step(threshold, "pm1", "gt")(at), -torch.ones(4))
    # hardened() keeps the declared tie, and an explicit tie overrides it.
    assert torch.equal(HTAF(threshold=threshold, tie="gt").hardened()(at), torch.zeros(4))
    assert torch.equal(HTAF(threshold=threshold, tie="gt").hardened("ge")(at), torch.ones(4))


def test_exact_step_keeps_dtype():
    for dt in (torch.float32, torch.float64):
        assert exact_step(torch.tensor([-1.0, 1.0], dtype=dt), 0.0, "pm1", "ge").dtype == dt


@pytest.mark.parametrize("levels", ["01", "pm1"])
@pytest.mark.parametrize("tie", ["ge", "gt"])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_surrogate_forward_is_step_backward_is_htaf_gradient(levels, tie, threshold):
    alpha, beta = 2.0, 4.0
    x = torch.cat([torch.linspace(-3, 3, 61, dtype=D) + threshold, torch.tensor([threshold], dtype=D)])
    xs = x.clone().requires_grad_(True)
    y = HTAF(alpha, beta, threshold=threshold, levels=levels, mode="surrogate", tie=tie)(xs)
    assert torch.equal(y.detach(), Step(threshold, levels, tie)(x))
    w = torch.randn(x.shape, dtype=D, generator=torch.Generator().manual_seed(0))
    (y * w).sum().backward()

    xh = x.clone().requires_grad_(True)
    (HTAF(alpha, beta, threshold=threshold, levels=levels, mode="smooth")(xh) * w).sum().backward()
    torch.testing.assert_close(xs.grad, xh.grad, rtol=1e-12, atol=1e-15)
    scale = 2 if levels == "pm1" else 1
    torch.testing.assert_close(xs.grad, w * scale * htaf_derivative(x - threshold, alpha, beta), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kwargs", [
    dict(alpha=0.0), dict(alpha=-1.0), dict(alpha=math.inf), dict(alpha=math.nan),
    dict(beta=-0.1), dict(beta=math.inf), dict(beta=math.nan),
    dict(levels="binary"), dict(levels="-1,1"), dict(mode="hard"), dict(tie="eq"), dict(tie="GE"),
])
def test_htaf_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        HTAF(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(levels="x"), dict(tie="lt")])
def test_step_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Step(**kwargs)


def test_htaf_accepts_beta_zero():
    h = HTAF(alpha=1.0, beta=0.0)  # plain logistic
    x = torch.linspace(-3, 3, 13, dtype=D)
    torch.testing.assert_close(h(x), torch.sigmoid(x))


# --------------------------------------------------------------------------------------- binary layers


def _sign(w):
    return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))


def test_binary_linear_uses_sign_weights_with_sign0_plus1():
    torch.manual_seed(0)
    layer = BinaryLinear(6, 4)
    with torch.no_grad():
        layer.weight[0, :3] = 0.0  # sign(0) = +1
    x = torch.randn(5, 6)
    expected_w = _sign(layer.weight.detach())
    assert expected_w[0, :3].eq(1).all()
    assert torch.equal(layer(x), F.linear(x, expected_w))
    # The zero entries matter: treating them as 0 or -1 gives another result.
    assert not torch.equal(layer(x), F.linear(x, torch.sign(layer.weight.detach())))


def test_binary_linear_bias_and_gradient_flows_to_latent_weights():
    torch.manual_seed(1)
    layer = BinaryLinear(3, 2, bias=True)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -2.0]))
        layer.weight.copy_(torch.tensor([[0.3, -0.2, 2.0], [-0.1, 0.0, 0.7]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(layer(x), torch.tensor([[1 - 2 + 3 + 0.5, -1 + 2 + 3 - 2.0]]))
    layer(x).sum().backward()
    # Straight-through, clipped at |w| <= 1 (as larq's ste_sign): the weight 2.0 gets no gradient.
    assert torch.equal(layer.weight.grad, torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 3.0]]))


def test_binary_linear_scale_is_mean_abs_per_output():
    torch.manual_seed(2)
    layer = BinaryLinear(5, 3, scale=True)
    x = torch.randn(4, 5)
    w = layer.weight.detach()
    expected = F.linear(x, _sign(w)) * w.abs().mean(dim=1)
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(layer(x), F.linear(x, _sign(w)))


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_freeze_makes_weights_pm1_and_keeps_outputs(scale, kind):
    torch.manual_seed(3)
    if kind == "linear":
        layer, x = BinaryLinear(8, 5, bias=True, scale=scale), torch.randn(4, 8)
    else:
        layer, x = BinaryConv2d(3, 4, 3, padding=1, scale=scale, bias=True), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        layer.weight.view(-1)[0] = 0.0
        layer.bias.normal_()
    before = layer(x).detach()
    latent = layer.weight.detach().clone()
    layer.freeze()
    assert layer.frozen
    assert set(layer.weight.detach().unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(layer.weight.detach(), _sign(latent))
    assert layer.weight.view(-1)[0].item() == 1.0
    if scale:
        torch.testing.assert_close(layer.scale, latent.abs().mean(dim=tuple(range(1, latent.dim()))))
    assert torch.equal(layer(x).detach(), before)
    layer.freeze()  # idempotent
    assert torch.equal(layer(x).detach(), before)


@pytest.mark.parametrize("pad_value", [None, 1.0, 0.0, -1.0])
def test_binary_conv_padding_value(pad_value):
    torch.manual_seed(4)
    kwargs = {} if pad_value is None else {"pad_value": pad_value}
    layer = BinaryConv2d(2, 3, 3, stride=1, padding=1, **kwargs)
    x = torch.randn(2, 2, 5, 5)
    value = 1.0 if pad_value is None else pad_value
    manual = F.conv2d(F.pad(x, (1, 1, 1, 1), value=value), _sign(layer.weight.detach()))
    assert torch.equal(layer(x), manual)
    assert layer(x).shape == (2, 3, 5, 5)
    if value != 0.0:
        zero_padded = F.conv2d(x, _sign(layer.weight.detach()), padding=1)
        assert not torch.allclose(layer(x), zero_padded)


def test_binary_conv_stride_no_padding_and_scale():
    torch.manual_seed(5)
    layer = BinaryConv2d(2, 4, 3, stride=2, scale=True)
    x = torch.randn(1, 2, 7, 7)
    w = layer.weight.detach()
    manual = F.conv2d(x, _sign(w), stride=2) * w.abs().mean(dim=(1, 2, 3)).reshape(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), manual)
    assert layer(x).shape == (1, 4, 3, 3)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_frozen_state_survives_state_dict_round_trip(kind):
    torch.manual_seed(6)
    make = (lambda: BinaryLinear(6, 3, scale=True)) if kind == "linear" else (lambda: BinaryConv2d(2, 3, 3, padding=1, scale=True))
    x = torch.randn(2, 6) if kind == "linear" else torch.randn(2, 2, 4, 4)
    layer = make()
    layer.freeze()
    state = layer.state_dict()
    assert any(k.endswith("_extra_state") for k in state)
    fresh = make()
    assert not fresh.frozen
    fresh.load_state_dict(state)
    assert fresh.frozen
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.scale, layer.scale)
    assert torch.equal(fresh(x), layer(x))
    # An unfrozen state dict keeps the layer unfrozen.
    other = make()
    other.load_state_dict(make().state_dict())
    assert not other.frozen


# ------------------------------------------------------------------------------------------------ LIF


def _run(lif, currents, v0=0.0):
    v = torch.tensor([v0], dtype=D)
    spikes, potentials = [], []
    for c in currents:
        s, v = lif(torch.tensor([c], dtype=D), v)
        spikes.append(s.item())
        potentials.append(v.item())
    return spikes, potentials


def test_lif_subtract_reset_hand_computed():
    lif = LIF(leak=0.5, threshold=1.0, reset="subtract")
    spikes, v = _run(lif, [0.6, 0.6, 0.6, 2.5, 0.0])
    # v: 0.6, 0.9, 1.05 -> spike -> 0.05, 0.025 + 2.5 = 2.525 -> spike -> 1.525, 0.7625
    assert spikes == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert v == pytest.approx([0.6, 0.9, 0.05, 1.525, 0.7625], abs=1e-12)


def test_lif_zero_reset_hand_computed():
    lif = LIF(leak=0.5, threshold=1.0, reset="zero")
    spikes, v = _run(lif, [0.6, 0.6, 0.6, 2.5, 0.0])
    # v: 0.6, 0.9, 1.05 -> spike -> 0, 2.5 -> spike -> 0, 0
    assert spikes == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert v == pytest.approx([0.6, 0.9, 0.0, 0.0, 0.0], abs=1e-12)


def test_lif_threshold_and_leak():
    lif = LIF(leak=1.0, threshold=2.0, reset="subtract")
    spikes, v = _run(lif, [0.75] * 6)
    # integrates without leak: 0.75, 1.5, 2.25 -> 0.25, 1.0, 1.75, 2.5 -> 0.5
    assert spikes == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert v == pytest.approx([0.75, 1.5, 0.25, 1.0, 1.75, 0.5], abs=1e-12)


@pytest.mark.parametrize("tie,fires", [("ge", 1.0), ("gt", 0.0)])
@pytest.mark.parametrize("mode", ["smooth", "surrogate"])
def test_lif_fires_at_exactly_threshold_only_under_ge(tie, fires, mode):
    lif = LIF(leak=0.9, threshold=1.0, reset="subtract", mode=mode, tie=tie)
    hard = htaf_export.harden(lif).model
    assert isinstance(hard.spike, Step) and hard.spike.tie == tie
    spikes, v = _run(hard, [1.0])  # v = 0.9 * 0 + 1.0 = threshold exactly
    assert spikes == [fires]
    assert v == [1.0 - fires]


def test_lif_bad_arguments():
    with pytest.raises(ValueError):
        LIF(leak=1.5)
    with pytest.raises(ValueError):
        LIF(reset="none")


# --------------------------------------------------------------------------------------------- TorchScript


class _Scripted(torch.nn.Module):
    """What a user scripts: smooth ±1 HTAF, a binary layer, a surrogate {0, 1} HTAF, float head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.a = torch.nn.Linear(10, 16), HTAF(levels="pm1")
        self.b, self.a2, self.head = BinaryLinear(16, 8), HTAF(mode="surrogate", tie="gt"), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a2(self.b(self.a(self.fc(x)))))


@pytest.mark.parametrize("module", [HTAF(levels="pm1"), HTAF(mode="surrogate"), Step(0.5, "pm1", "gt"),
                                    BinaryLinear(6, 3, bias=True, scale=True), BinaryConv2d(2, 3, 3, padding=1)],
                         ids=lambda m: type(m).__name__)
def test_the_layers_can_be_scripted_and_compute_the_same(module):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 5, 5) if isinstance(module, BinaryConv2d) else torch.randn(4, 6)
    assert torch.equal(torch.jit.script(module.eval())(x), module(x))


def test_a_lif_neuron_can_be_scripted():
    lif, current, v = LIF(0.8, 1.0, "zero").eval(), torch.randn(4, 6), torch.rand(4, 6)
    scripted = torch.jit.script(lif)
    assert all(torch.equal(a, b) for a, b in zip(scripted(current, v), lif(current, v)))


@pytest.mark.slow
def test_a_scripted_model_hardens_and_its_binary_layer_bit_packs(tmp_path):
    """torch.jit.script failed on these layers; scripted, the smooth HTAF is a function call, which must be read
    (else the smooth curve was exported as it is), and two HTAFs of one configuration share one graph."""
    import contextlib
    import importlib.util
    import io

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_Scripted().eval()), tmp_path / "s.pt")
    target = "tflite" if importlib.util.find_spec("larq_compute_engine") else "onnx-int8"
    out = tmp_path / ("s.tflite" if target == "tflite" else "s.int8.onnx")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(tmp_path / "s.pt", target, out, input_shape=[10], device="cpu")
    assert result.report.passed, result.report.failure_line()
    assert [(s.name, s.how) for s in result.hardening.sites] == [("a", "HTAF composite")]
    rows = {r.layer: r.became for r in result.conversion.rows}
    assert rows.get("b") in ("LceBconv2d (bit-packed)", "MatMulInteger (threshold)"), rows
