"""Hardening: HTAF sites become exact steps, binary layers freeze, and the gap is measured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import htaf_export
from htaf_export import models
from htaf_export.errors import BadInput
from htaf_export.harden import GAP_TOLERANCE, measure_gap
from htaf_export.nn import HTAF, BinaryConv2d, BinaryLinear, Step, htaf_function

from conftest import SAMPLE_NAMES, outputs_equal, save_pt2


def _htaf_sites(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, HTAF)}


def test_returns_a_copy_and_leaves_input_alone(load_sample):
    model = load_sample("bnn_cnn").module
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    sites_before = _htaf_sites(model)
    result = htaf_export.harden(model)
    assert result.model is not model
    assert _htaf_sites(model).keys() == sites_before.keys()
    assert all(model.get_submodule(n) is m for n, m in sites_before.items())  # still the same HTAF objects
    assert not any(isinstance(m, Step) for m in model.modules())
    assert not any(b.frozen for b in model.modules() if isinstance(b, (BinaryLinear, BinaryConv2d)))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    # The hardened copy shares no tensors with the input.
    hard_params = {p.data_ptr() for p in result.model.parameters()}
    assert not hard_params & {p.data_ptr() for p in model.parameters()}


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_every_htaf_becomes_step_and_sites_are_recorded(name, load_sample):
    model = load_sample(name).module
    smooth = _htaf_sites(model)
    assert smooth
    result = htaf_export.harden(model)
    hard = result.model
    assert not any(isinstance(m, HTAF) for m in hard.modules())
    assert [s.name for s in result.sites] == list(smooth)
    for site in result.sites:
        h, step = smooth[site.name], hard.get_submodule(site.name)
        assert isinstance(step, Step)
        assert (step.threshold, step.levels, step.tie) == (h.threshold, h.levels, h.tie)
        assert site.was == "htaf" and site.levels == h.levels and site.threshold == h.threshold
        assert (site.alpha, site.beta, site.mode, site.tie) == (h.alpha, h.beta, h.mode, h.tie)
    d = result.to_dict()
    assert [s["name"] for s in d["sites"]] == list(smooth) and d["tie"] is None
    assert not hard.training


@pytest.mark.parametrize("name", ["bnn_mlp", "bnn_cnn"])
def test_binary_layers_frozen(name, load_sample):
    hard = htaf_export.harden(load_sample(name).module).model
    binary = [m for m in hard.modules() if isinstance(m, (BinaryLinear, BinaryConv2d))]
    assert binary
    for b in binary:
        assert b.frozen
        assert set(b.weight.unique().tolist()) == {-1.0, 1.0}


def test_already_hardened_sites_are_kept(load_sample):
    once = htaf_export.harden(load_sample("dhn_mlp").module)
    twice = htaf_export.harden(once.model)
    assert [s.name for s in twice.sites] == [s.name for s in once.sites]
    assert all(s.was == "step" for s in twice.sites)
    x = torch.randn(8, 64)
    assert torch.equal(twice.model(x), once.model(x))


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_hardened_outputs_equal_htaf_threshold_computation(name, load_sample, digits_test):
    """Run the smooth model, but replace each HTAF's output by (HTAF(u) >= 1/2) on its levels."""
    ld = load_sample(name)
    smooth = ld.module
    x, _ = digits_test(ld.input_shape)

    def binarize(m, inputs, _output):
        fired = (htaf_function(inputs[0] - m.threshold, m.alpha, m.beta) >= 0.5).to(inputs[0].dtype)
        return fired if m.levels == "01" else 2 * fired - 1

    hard = htaf_export.harden(smooth).model
    with torch.no_grad():
        plain = smooth(x)
        hooks = [m.register_forward_hook(binarize) for m in _htaf_sites(smooth).values()]
        try:
            reference = smooth(x)
        finally:
            for h in hooks:
                h.remove()
        assert outputs_equal(hard(x), reference)
        if any(m.mode == "smooth" for m in _htaf_sites(smooth).values()):
            assert not outputs_equal(plain, reference)  # hardening changed something, so the check has teeth


def test_tie_applies_where_the_model_declares_none(load_sample):
    default = htaf_export.harden(load_sample("bnn_mlp").module)
    assert all(s.tie == "ge" for s in default.sites)  # the sample declares ge at every site
    with pytest.raises(BadInput, match="conflicts with the tie rule the model declares at layers.act1"):
        htaf_export.harden(load_sample("bnn_mlp").module, tie="gt")
    assert all(s.tie == "ge" for s in htaf_export.harden(load_sample("bnn_mlp").module, tie="ge").sites)
    mixed = nn.Sequential(HTAF(threshold=0.5), HTAF(tie="gt"))  # the first site declares no rule
    assert [s.tie for s in htaf_export.harden(mixed).sites] == ["ge", "gt"]
    assert [s.tie for s in htaf_export.harden(mixed, tie="gt").sites] == ["gt", "gt"]


@pytest.mark.parametrize("declared", [None, "ge", "gt"])
@pytest.mark.parametrize("override", [None, "ge", "gt"])
def test_tie_at_threshold_follows_the_declared_rule_else_the_option(declared, override):
    model = nn.Sequential(nn.Identity(), HTAF(2.0, 4.0, threshold=0.5, tie=declared))
    if declared is not None and override is not None and declared != override:
        with pytest.raises(BadInput, match="conflicts"):
            htaf_export.harden(model, tie=override)
        return
    hard = htaf_export.harden(model, tie=override).model
    x = torch.tensor([0.4, 0.5, 0.6])
    at = 0.0 if (declared or override) == "gt" else 1.0
    assert torch.equal(hard(x), torch.tensor([0.0, at, 1.0]))


def test_bad_tie():
    with pytest.raises(BadInput, match="tie"):
        htaf_export.harden(models.build("dhn_mlp"), tie="lt")


@pytest.mark.parametrize("name", ["dhn_mlp", "icbm_cnn", "bnn_mlp"])
def test_gap_and_accuracy_with_digits(name, load_sample, digits_test):
    ld = load_sample(name)
    x, y = digits_test(ld.input_shape)
    result = htaf_export.harden(ld.module, x, y, batch_size=100)
    sites = _htaf_sites(ld.module)
    assert [g.name for g in result.gaps] == list(sites)

    # Independent count of unsaturated pre-activations, from hooks on the smooth model.
    pre: dict[str, list[torch.Tensor]] = {n: [] for n in sites}
    hooks = [m.register_forward_hook(lambda _m, i, _o, n=n: pre[n].append(i[0].detach())) for n, m in sites.items()]
    with torch.no_grad():
        out = ld.module(x)
    for h in hooks:
        h.remove()
    for g in result.gaps:
        m, u = sites[g.name], torch.cat(pre[g.name]) - sites[g.name].threshold
        assert g.count == u.numel() == len(x) * u.shape[1]
        diff = (htaf_function(u, m.alpha, m.beta) - (u >= 0).float()).abs()
        assert g.unsaturated == int((diff > GAP_TOLERANCE).sum())
        assert 0 <= g.fraction <= 1

    logits = out[0] if isinstance(out, tuple) else out
    assert result.smooth_accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    with torch.no_grad():
        hard_out = result.model(x)
    hard_logits = hard_out[0] if isinstance(hard_out, tuple) else hard_out
    assert result.hardened_accuracy == pytest.approx((hard_logits.argmax(1) == y).float().mean().item())
    assert result.hardened_accuracy > 0.9
    # Hardened accuracy does not depend on alpha, so it must match what training recorded.
    assert result.hardened_accuracy == pytest.approx(ld.meta["hardened_accuracy"])
    d = result.to_dict()
    assert d["hardened_accuracy"] == result.hardened_accuracy
    assert all("fraction" in g for g in d["gaps"])


def test_gap_shrinks_as_alpha_grows(load_sample, digits_test):
    ld = load_sample("dhn_mlp")
    x, _ = digits_test(ld.input_shape)
    fractions = []
    for alpha in (0.5, 5.0, 50.0):
        for m in _htaf_sites(ld.module).values():
            m.alpha = alpha
        gaps = measure_gap(ld.module, x)
        fractions.append(sum(g.unsaturated for g in gaps) / sum(g.count for g in gaps))
    assert fractions[0] > fractions[1] > fractions[2]
    assert fractions[0] > 0.5 and fractions[2] < 0.1


def test_data_without_labels_gives_gaps_only(load_sample, digits_test):
    ld = load_sample("dhn_mlp")
    x, _ = digits_test(ld.input_shape, 50)
    result = htaf_export.harden(ld.module, x)
    assert len(result.gaps) == 2 and result.gaps[0].count == 50 * 256
    assert result.smooth_accuracy is None and result.hardened_accuracy is None
    assert htaf_export.harden(ld.module).gaps == []


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
@pytest.mark.parametrize("levels", ["01", "pm1"])
def test_traced_smooth_sites_harden_exactly_as_the_module_does(fmt, levels, tmp_path, digits_test):
    """A program saved straight after training (smooth HTAF traced into its graph) hardens to the same
    function as the module, site for site, including inputs exactly on a threshold."""
    model = models.build("dhn_mlp", dict(hidden=[8, 4])).eval()
    for m in model.modules():
        if isinstance(m, HTAF):
            m.levels, m.threshold = levels, 0.125
    ld = htaf_export.load(htaf_export.save(model, tmp_path / f"smooth.{fmt}", format=fmt))
    result = htaf_export.harden(ld.module)
    assert [(s.name, s.levels, s.threshold, s.alpha, s.beta) for s in result.sites] == [
        (f"layers.act{k}", levels, 0.125, 2.0, 4.0) for k in (1, 2)]
    assert all(s.how == "HTAF composite" and s.was == "htaf" for s in result.sites)
    module = htaf_export.harden(model).model
    x, _ = digits_test([64], 200)
    with torch.no_grad():
        assert outputs_equal(result.model(x), module(x))
        assert not outputs_equal(ld.module(x), module(x))  # the loaded program is still smooth
    if fmt == "pt2":  # the program's sites are Step modules now, so the reference records them
        assert sorted(n for n, m in result.model.named_modules() if isinstance(m, Step)) == ["layers.act1",
                                                                                             "layers.act2"]


def test_traced_smooth_sites_take_the_tie_option(tmp_path):
    """A traced graph does not record a smooth site's tie rule: --tie gives it, ge by default."""
    model = nn.Sequential(nn.Linear(2, 2), HTAF(threshold=0.5))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    path = htaf_export.save(model, tmp_path / "m.pt2", format="pt2", input_shape=[2])
    at = torch.tensor([[0.5, 0.25]])
    for tie, expected in ((None, [1.0, 0.0]), ("ge", [1.0, 0.0]), ("gt", [0.0, 0.0])):
        hard = htaf_export.harden(htaf_export.load(path).module, tie=tie)
        assert hard.sites[0].tie == (tie or "ge")
        assert torch.equal(hard.model(at), torch.tensor([expected]))


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_reproduces_recorded_gap_and_accuracy(name, load_sample, digits_test):
    """What training recorded in meta is what the loaded model measures: the smooth sites came back intact."""
    ld = load_sample(name)
    x, y = digits_test(ld.input_shape)
    result = htaf_export.harden(ld.module, x, y)
    unsaturated = sum(g.unsaturated for g in result.gaps) / sum(g.count for g in result.gaps)
    assert unsaturated == pytest.approx(ld.meta["unsaturated"], abs=1e-9)
    assert result.smooth_accuracy == pytest.approx(ld.meta["smooth_accuracy"], abs=1e-9)


def test_a_lost_smooth_tie_is_said_at_export_with_advice_that_works(tmp_path):
    """A .pt2 keeps a smooth HTAF only as its formula (no tie rule); when another site records ge, --tie gt
    would be refused, so the note must not advise it."""
    from htaf_export.nn import HTAF

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.s1 = torch.nn.Linear(8, 6), HTAF(tie="gt")
            self.fc2, self.s2 = torch.nn.Linear(6, 6), HTAF(levels="pm1", mode="surrogate", tie="ge")
            self.fc3 = torch.nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(self.s2(self.fc2(self.s1(self.fc1(x)))))

    path = tmp_path / "mixed.pt2"
    save_pt2(Mixed().eval(), torch.randn(2, 8), path)
    result = htaf_export.export(path, "onnx", tmp_path / "m.onnx", validate_artifact=False)
    note = next(n for n in result.conversion.notes if "tie rule of a smooth HTAF" in n)
    assert "at 's1' the step fires at the threshold itself (ge)" in note and "conflict with the ge rule recorded at s2" in note
    assert "pass --tie gt" not in note
