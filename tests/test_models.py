"""The registered reference architectures of the four families."""

from __future__ import annotations

import pytest
import torch

import htaf_export
from htaf_export import models
from htaf_export.nn import HTAF, LIF, BinaryConv2d, BinaryLinear, Step

ARCHS = ["bnn_cnn", "bnn_mlp", "dhn_mlp", "icbm_cnn", "snn_mlp"]
FAMILY = {"bnn_mlp": "bnn", "bnn_cnn": "bnn", "dhn_mlp": "dhn", "snn_mlp": "snn", "icbm_cnn": "icbm"}

# A non-default size per architecture, and the input/output shapes it implies.
SMALL = {
    "bnn_mlp": (dict(in_features=20, hidden=[32, 16, 8], classes=5, scale=True), [20], 5),
    "bnn_cnn": (dict(in_channels=3, image_size=12, channels=[4, 8, 6], classes=7, scale=True), [3, 12, 12], 7),
    "dhn_mlp": (dict(in_features=10, hidden=[12], classes=3, alpha=5.0, beta=1.0), [10], 3),
    "snn_mlp": (dict(in_features=16, hidden=[8, 8, 4], classes=4, steps=3, reset="zero"), [16], 4),
    "icbm_cnn": (dict(in_channels=2, image_size=6, channels=[4], concepts=5, classes=3), [2, 6, 6], 3),
}
DEFAULT_SHAPES = {"bnn_mlp": [64], "bnn_cnn": [1, 8, 8], "dhn_mlp": [64], "snn_mlp": [64], "icbm_cnn": [1, 8, 8]}


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


BUILT_IN = [a for a in models.architectures() if not a.startswith("gallery.")]  # other tests register their own


def test_registry_lists_every_family():
    assert set(ARCHS) <= set(models.architectures())
    assert models.architectures() == sorted(models.architectures())
    assert {models.build(a).family for a in BUILT_IN} == {"bnn", "dhn", "snn", "icbm"}


def test_unknown_architecture():
    with pytest.raises(models.UnknownArchitecture, match="unknown architecture 'resnet'"):
        models.build("resnet")


def test_register_twice_refused():
    with pytest.raises(ValueError, match="already registered"):
        models.register("dhn_mlp")(type("Other", (models.ReferenceModel,), {}))


@pytest.mark.parametrize("arch", BUILT_IN)
def test_builds_with_defaults(arch):
    torch.manual_seed(0)
    m = models.build(arch).eval()
    assert m.arch == arch and m.family == FAMILY.get(arch, m.family)
    assert m.family in ("bnn", "dhn", "snn", "icbm")
    assert m.input_shape == DEFAULT_SHAPES.get(arch, m.input_shape)
    out = m(torch.rand(3, *m.input_shape))
    assert _logits(out).shape == (3, 10)
    assert len(m.output_names) == (2 if isinstance(out, tuple) else 1)
    # Every family has at least one HTAF site.
    assert any(isinstance(x, HTAF) for x in m.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_with_non_default_size(arch):
    torch.manual_seed(0)
    config, shape, classes = SMALL[arch]
    m = models.build(arch, config).eval()
    assert m.input_shape == shape
    out = m(torch.rand(4, *shape))
    assert _logits(out).shape == (4, classes)
    for key, value in config.items():
        assert m.config[key] == value
    # The recorded config rebuilds the same architecture: same parameter names and shapes.
    again = models.build(arch, m.config)
    assert {k: v.shape for k, v in again.state_dict().items() if isinstance(v, torch.Tensor)} == \
           {k: v.shape for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    # Default and non-default builds really differ.
    assert sum(p.numel() for p in m.parameters()) != sum(p.numel() for p in models.build(arch).parameters())


@pytest.mark.parametrize("arch", ["bnn_mlp", "bnn_cnn"])
def test_bnn_layers_are_binary(arch):
    m = models.build(arch)
    binary = [x for x in m.modules() if isinstance(x, (BinaryLinear, BinaryConv2d))]
    assert binary and all(isinstance(x, (BinaryLinear, BinaryConv2d)) for x in [m.layers.fc_out])
    assert all(h.levels == "pm1" for h in m.modules() if isinstance(h, HTAF))
    if arch == "bnn_cnn":
        assert m.layers.conv1.pad_value == 0.0 and m.layers.conv2.pad_value == 1.0


def test_bnn_hidden_activations_are_pm1_after_hardening():
    torch.manual_seed(0)
    m = models.build("bnn_cnn").eval()
    hard = htaf_export.harden(m).model
    seen = []
    hooks = [s.register_forward_hook(lambda _m, _i, o: seen.append(o)) for s in hard.modules() if isinstance(s, Step)]
    hard(torch.rand(2, 1, 8, 8))
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    assert all(set(o.unique().tolist()) <= {-1.0, 1.0} for o in seen)


@pytest.mark.parametrize("config", [{}, SMALL["icbm_cnn"][0]])
def test_icbm_returns_logits_and_binary_concepts(config):
    torch.manual_seed(0)
    m = models.build("icbm_cnn", config).eval()
    n_concepts = m.config["concepts"]
    x = torch.rand(6, *m.input_shape)
    logits, concepts = m(x)
    assert concepts.shape == (6, n_concepts)
    assert m.output_names == ("logits", "concepts")
    # Smooth: concepts are strictly inside (0, 1); hardened: exactly 0 or 1, and the head reads them.
    assert ((concepts > 0) & (concepts < 1)).any()
    hard = htaf_export.harden(m).model
    h_logits, h_concepts = hard(x)
    assert h_concepts.shape == (6, n_concepts)
    assert set(h_concepts.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(h_logits, hard.head(h_concepts))
    assert torch.equal(h_concepts, (m.concept_bn(m.concept_fc(m.backbone(x))) >= 0).float())


def _unroll(m, x, state=None):
    v = state if state is not None else m.initial_state(x.shape[0])
    total = 0
    for _ in range(m.steps):
        out, *v = m.step(x, *v)
        total = total + out
    return total / m.steps, v


@pytest.mark.parametrize("config", [{}, SMALL["snn_mlp"][0]])
@pytest.mark.parametrize("hardened", [False, True])
def test_snn_step_with_state_reproduces_forward(config, hardened):
    torch.manual_seed(0)
    m = models.build("snn_mlp", config).eval()
    if hardened:
        m = htaf_export.harden(m).model
    x = 3 * torch.rand(5, *m.input_shape)
    unrolled, v = _unroll(m, x)
    torch.testing.assert_close(unrolled, m(x), rtol=0, atol=0)
    assert [t.shape for t in v] == [(5, h) for h in m.hidden]
    # The state is real: after one step it is no longer zero, and it changes the next step.
    out1, *v1 = m.step(x, *m.initial_state(5))
    assert v1[0].abs().sum() > 0
    spikes_from_zero, _ = m.lifs[0](m.fcs[0](x), torch.zeros_like(v1[0]))
    spikes_from_v1, _ = m.lifs[0](m.fcs[0](x), v1[0])
    assert not torch.equal(spikes_from_zero, spikes_from_v1)


def test_snn_state_in_out_streaming():
    """Two calls of step() carrying state equal one run of two steps: the state is all there is."""
    torch.manual_seed(1)
    m = models.build("snn_mlp", dict(steps=2)).eval()
    x = 2 * torch.rand(3, 64)
    s0 = m.initial_state(3)
    a, *s1 = m.step(x, *s0)
    b, *s2 = m.step(x, *[t.clone() for t in s1])
    torch.testing.assert_close((a + b) / 2, m(x), rtol=0, atol=0)
    # Starting from another state gives another output.
    c, *_ = m.step(x, *[t + 0.5 for t in s1])
    assert not torch.equal(b, c)


def test_snn_uses_lif_sites():
    m = models.build("snn_mlp", dict(hidden=[8, 4], reset="zero", threshold=0.5, leak=0.8))
    lifs = [x for x in m.modules() if isinstance(x, LIF)]
    assert len(lifs) == 2
    assert all(l.reset == "zero" and l.threshold == 0.5 and l.leak == 0.8 for l in lifs)
    assert all(l.spike.threshold == 0.5 for l in lifs)
