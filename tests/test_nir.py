"""nir target: LIF layers (zero reset) and Heaviside steps as NIR graphs, validated by snnTorch's importer and by
this project's own NIR simulator; the parameter mapping, ties, refusals, sabotage, round trip and inspect."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import htaf_export
from htaf_export import cli
from htaf_export.converters.nir_graph import DT, lif_parameters
from htaf_export.models.snn import SnnMLP
from htaf_export.nn import HTAF

from conftest import save_pt2
from spiking_models import AudioSNN, zero_reset_lif

nir = pytest.importorskip("nir")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _export(source, out: Path, **kwargs) -> htaf_export.ExportResult:
    with contextlib.redirect_stdout(io.StringIO()):
        return htaf_export.export(source, "nir", out, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def zero_reset_snn(tmp_path_factory) -> Path:
    """A spiking MLP with a zero reset and leaks other than the samples', saved as a checkpoint."""
    torch.manual_seed(3)
    model = SnnMLP(in_features=64, hidden=(40, 24), classes=10, steps=5, leak=0.8125, threshold=0.6,
                   reset="zero").eval()
    with torch.no_grad():
        for fc in model.fcs:
            fc.weight.mul_(2.0)  # enough drive that most neurons fire in 5 steps
    path = tmp_path_factory.mktemp("snn") / "snn_zero.pt"
    htaf_export.save(model, path)
    return path


def _nodes(path: Path) -> dict[str, str]:
    return {name: type(node).__name__ for name, node in nir.read(path).nodes.items()}


def test_a_zero_reset_snn_passes_on_snntorch_and_nir_sim_bit_for_bit(zero_reset_snn, tmp_path):
    result = _export(zero_reset_snn, tmp_path / "m.nir")
    report = result.report
    assert report.passed, report.failure_line()
    assert [b.backend for b in report.backends] == ["nir-sim", "snntorch"]
    for backend in report.backends:
        spikes = [t for t in backend.tensors if t.kind == "binary"]
        assert len(spikes) == 2 * 5 and all(t.elements > 0 for t in spikes)  # every layer at every time step
        assert all(t.max_abs_error == 0 for t in backend.tensors), [(t.name, t.max_abs_error) for t in backend.tensors]
    kinds = _nodes(result.artifact)
    assert sorted(kinds.values()).count("LIF") == 2 and kinds["lifs_0_spike"] == "LIF"


class LeakyReadoutSNN(torch.nn.Module):
    """A user's loop: one LIF layer (zero reset by torch.where, tie gt) and a leaky readout whose state, averaged
    over the steps, is the output."""

    def __init__(self, readout_leak: float | torch.Tensor = 0.5) -> None:
        super().__init__()
        from htaf_export.nn import HTAF

        self.inp, self.out = torch.nn.Linear(64, 30), torch.nn.Linear(30, 10)
        self.spike = HTAF(2.0, 4.0, threshold=0.4, levels="01", mode="surrogate", tie="gt")
        self.register_buffer("readout_leak", torch.as_tensor(readout_leak, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = self.inp(x)
        v = torch.zeros_like(current)
        vo = torch.zeros(x.shape[0], 10)
        total = torch.zeros(x.shape[0], 10)
        for _ in range(6):
            v = 0.875 * v + current
            s = self.spike(v)
            v = torch.where(s > 0, torch.zeros_like(v), v)
            vo = self.readout_leak * vo + self.out(s)
            total = total + vo
        return total / 6


@pytest.mark.parametrize("leak", [0.5, torch.linspace(0.25, 0.75, 10)], ids=["one", "per-neuron"])
def test_a_leaky_readout_becomes_a_nir_li_node(tmp_path, leak):
    """One leak, or one per output unit (a learned tensor): each τ gives its leak back exactly."""
    torch.manual_seed(1)
    model = LeakyReadoutSNN(leak).eval()
    path = tmp_path / "leaky.pt2"
    save_pt2(model, torch.zeros(2, 64), path)
    result = _export(path, tmp_path / "leaky.nir")
    assert result.report.passed, result.report.failure_line()
    kinds = _nodes(result.artifact)
    assert kinds["logits_readout"] == "LI" and kinds["spike"] == "LIF"
    graph = nir.read(result.artifact)
    assert ("out", "logits_readout") in graph.edges and ("logits_readout", "logits") in graph.edges
    assert np.array_equal(np.float32(1 - DT / graph.nodes["logits_readout"].tau) * np.ones(10, np.float32),
                          np.broadcast_to(np.asarray(leak, np.float32), (10,)))
    assert [b.backend for b in result.report.backends] == ["nir-sim"]  # snnTorch has no module for LI
    assert all(t.max_abs_error == 0 for t in result.report.backends[0].tensors)


class EventStreamSNN(torch.nn.Module):
    """A user's loop over an event stream: input (N, T, 20), one step of it per time step."""

    def __init__(self) -> None:
        super().__init__()
        from htaf_export.nn import HTAF

        self.fc1, self.fc2 = torch.nn.Linear(20, 16), torch.nn.Linear(16, 4)
        self.lif1 = HTAF(2.0, 4.0, threshold=0.5, levels="01", mode="surrogate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros(x.shape[0], 16)
        out = torch.zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            v = 0.9 * v + self.fc1(x[:, t])
            s = self.lif1(v)
            v = v * (1 - s)
            out = out + self.fc2(s)
        return out


def test_an_event_stream_input_is_fed_one_step_at_a_time(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "events.pt2"
    save_pt2(EventStreamSNN().eval(), torch.zeros(2, 7, 20), path)
    result = _export(path, tmp_path / "events.nir")
    assert result.report.passed, result.report.failure_line()
    assert [b.backend for b in result.report.backends] == ["nir-sim", "snntorch"]
    for backend in result.report.backends:
        assert sum(t.kind == "binary" for t in backend.tensors) == 7
        assert all(t.max_abs_error == 0 for t in backend.tensors)
    graph = nir.read(result.artifact)
    assert list(graph.nodes["input"].input_type["input"]) == [20]  # one step of the stream
    capsys.readouterr()
    assert cli.main(["inspect", str(result.artifact)]) == 0
    assert "inputs input one step at a time" in capsys.readouterr().out


class WarmStartSNN(torch.nn.Module):
    """Not a NIR LIF: its membrane starts at 0.3, not 0."""

    def __init__(self) -> None:
        super().__init__()
        from htaf_export.nn import HTAF

        self.fc, self.out = torch.nn.Linear(64, 12), torch.nn.Linear(12, 10)
        self.spike = HTAF(2.0, 4.0, threshold=0.5, levels="01", mode="surrogate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = self.fc(x)
        v = torch.full_like(current, 0.3)
        total = torch.zeros(x.shape[0], 10)
        for _ in range(4):
            v = 0.9 * v + current
            s = self.spike(v)
            v = v * (1 - s)
            total = total + self.out(s)
        return total


def test_a_membrane_that_does_not_start_at_zero_is_refused(tmp_path, capsys):
    path = tmp_path / "warm.pt2"
    save_pt2(WarmStartSNN().eval(), torch.zeros(2, 64), path)
    out = tmp_path / "warm.nir"
    assert cli.main([str(path), "--target", "nir", "-o", str(out), "--no-validate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "starts from a non-zero state" in err and "\n" not in err and not out.exists()


def test_the_bundled_zero_reset_sample_exports_with_every_spike_identical(tmp_path):
    result = _export(SAMPLES / "snn_zero_mlp.pt", tmp_path / "s.nir")
    report = result.report
    assert report.passed and [b.backend for b in report.backends] == ["nir-sim", "snntorch"]
    for backend in report.backends:
        assert backend.artifact_correct == backend.reference_correct > 0.95 * backend.labelled
        assert all(t.mismatched == 0 for t in backend.tensors)


def test_the_lif_mapping_gives_back_each_leak_exactly():
    """β = 1 − dt/τ, rounded to float32, is the model's leak for every float32 leak in [0, 1] (a sample of them,
    plus the ends), and the input's factor r·dt/τ is one; snnTorch computes β the same way."""
    rng = np.random.default_rng(0)
    leaks = np.concatenate([rng.random(20000, dtype=np.float32), np.float32([0.0, 1.0, 0.9, 0.5, 1 - 2**-24])])
    for leak in leaks:
        p = lif_parameters(float(leak), np.float32(1.0), "gt", (1,))
        assert np.float32(1 - DT / p["tau"][0]) == leak
        assert np.float32(p["r"][0] * DT / p["tau"][0]) == 1
    assert p["v_threshold"][0] == np.float32(1.0)


def test_ge_sites_fire_at_the_threshold_itself():
    p = lif_parameters(0.5, np.float32(0.6), "ge", (3,))
    v = np.float32(0.6)
    assert v > p["v_threshold"][0] and not np.nextafter(v, np.float32(0)) > p["v_threshold"][0]


def test_the_dhn_sample_becomes_threshold_nodes_and_snntorch_says_why_it_cannot_run_it(tmp_path):
    result = _export(SAMPLES / "dhn_mlp.pt", tmp_path / "d.nir")
    assert result.report.passed, result.report.failure_line()
    assert [b.backend for b in result.report.backends] == ["nir-sim"]
    assert any(s["backend"] == "snntorch" and "Threshold" in s["reason"] for s in result.report.skipped)
    assert sorted(_nodes(result.artifact).values()).count("Threshold") == 2


@pytest.mark.parametrize(("sample", "reason"), [("snn_mlp", "subtract reset"), ("bnn_mlp", "±1 sign"),
                                                ("icbm_cnn", "MaxPool")])
def test_what_nir_cannot_express_is_refused_in_one_line(sample, reason, tmp_path, capsys):
    out = tmp_path / "m.nir"
    assert cli.main([str(SAMPLES / f"{sample}.pt"), "--target", "nir", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and "\n" not in err and not out.exists()


def _sabotaged(good: Path, bad: Path, change) -> None:
    graph = nir.read(good)
    change(graph.nodes)
    nir.write(bad, graph)


@pytest.mark.parametrize(("what", "first_failing"), [("weight", "lifs.0.spike@"), ("threshold", "lifs.1.spike@")])
def test_a_sabotaged_file_fails_and_names_the_node(zero_reset_snn, tmp_path, capsys, what, first_failing):
    good = _export(zero_reset_snn, tmp_path / "m.nir", validate_artifact=False).artifact
    bad = tmp_path / "bad.nir"

    def change(nodes) -> None:
        if what == "weight":
            nodes["fcs_0"].weight[3, 7] += np.float32(0.5)  # one weight
        else:
            nodes["lifs_1_spike"].v_threshold[:] += np.float32(0.05)  # one layer's threshold

    _sabotaged(good, bad, change)
    capsys.readouterr()
    assert cli.main(["validate", str(zero_reset_snn), str(bad), "--device", "cpu"]) == 1
    out = capsys.readouterr().out.replace("\n", " ")
    assert f"first failing tensor {first_failing}" in out
    assert ("fcs_0" if what == "weight" else "fcs_1") in out  # the node that feeds the failing neuron


def test_reading_a_file_gives_back_the_same_graph(zero_reset_snn, tmp_path):
    """read → write → read: the same nodes, parameters, edges and metadata (HDF5 bytes may differ: h5py lays out
    what it reads back in its own order)."""
    path = _export(zero_reset_snn, tmp_path / "m.nir", validate_artifact=False).artifact
    graph = nir.read(path)
    again = tmp_path / "again.nir"
    nir.write(again, graph)
    reread = nir.read(again)
    assert {k: str(v) for k, v in reread.metadata.items()} == {k: str(v) for k, v in graph.metadata.items()}
    assert sorted(reread.edges) == sorted(graph.edges) and set(reread.nodes) == set(graph.nodes)
    for name, node in graph.nodes.items():
        for key, value in vars(node).items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(value, getattr(reread.nodes[name], key)), (name, key)
    assert reread.metadata["htaf_export.nir.time_steps"] == "5"


def test_inspect_shows_nodes_neuron_parameters_and_the_mapping(zero_reset_snn, tmp_path, capsys):
    path = _export(zero_reset_snn, tmp_path / "m.nir", validate_artifact=False).artifact
    capsys.readouterr()
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for expected in ("fcs_0", "Affine", "LIF", "0.8125", "lifs.0.spike", "lifs.0.spike@0", "time steps: 5",
                     "sum over steps ÷ 5"):
        assert expected in out, expected


def test_a_damaged_nir_file_is_one_line_exit_2(zero_reset_snn, tmp_path, capsys):
    bad = tmp_path / "bad.nir"
    bad.write_bytes(b"not hdf5")
    assert cli.main(["validate", str(zero_reset_snn), str(bad)]) == 2
    assert cli.main(["inspect", str(bad)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("not a readable NIR file" in e for e in errors)


class TwoLayerLoop(torch.nn.Module):
    """A user's hand-written two-layer zero-reset LIF loop with plain comparisons: both layers' steps belong to
    the one module, so they share its site and are told apart by the weights they read."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(12, 9), torch.nn.Linear(9, 4), torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v1, v2, count = torch.zeros(x.shape[0], 9), torch.zeros(x.shape[0], 4), 0
        drive = self.fc1(x)
        for _ in range(4):
            s1, v1 = zero_reset_lif(v1, drive, 0.8, 1.0)
            s2, v2 = zero_reset_lif(v2, self.fc2(s1), 0.8, 1.0)
            count = count + self.fc3(s2)
        return count


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_a_hand_written_two_layer_loop_becomes_two_lif_layers(tmp_path, fmt):
    torch.manual_seed(0)
    model, x = TwoLayerLoop().eval(), torch.randn(2, 12)
    path = tmp_path / f"loop.{'pt2' if fmt == 'pt2' else 'ts.pt'}"
    if fmt == "pt2":
        save_pt2(model, x, path)
    else:
        torch.jit.save(torch.jit.trace(model, x), str(path))
    result = _export(path, tmp_path / "loop.nir", input_shape=[12])
    assert result.report.passed, result.report.failure_line()
    assert sorted(_nodes(result.artifact).values()).count("LIF") == 2


class ResidualHeaviside(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
        self.s1, self.s2 = HTAF(levels="01"), HTAF(levels="01")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.s1(self.fc1(x))
        return self.s2(self.fc2(a) + a)  # the sum NIR cannot express


def test_a_refusal_of_an_exporters_node_names_the_users_source_line(tmp_path, capsys):
    path = tmp_path / "residual.pt2"
    program = torch.export.export(ResidualHeaviside().eval(), (torch.zeros(2, 6),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    assert cli.main([str(path), "--target", "nir", "-o", str(tmp_path / "r.nir")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "(from test_nir.py:" in err and "self.s2(self.fc2(a) + a)" in err, err
    assert not (tmp_path / "r.nir").exists()


class DepthwiseHeaviside(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.s1 = torch.nn.Conv2d(1, 4, 3, padding=1), HTAF()
        self.dw, self.s2 = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4), HTAF()
        self.fc = torch.nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.s2(self.dw(self.s1(self.c1(x)))).flatten(1))


def test_a_depthwise_conv_becomes_one_block_diagonal_nir_conv(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "dw.pt2"
    save_pt2(DepthwiseHeaviside().eval(), torch.randn(2, 1, 8, 8), path)
    result = _export(path, tmp_path / "dw.nir")
    assert result.report.passed, result.report.failure_line()
    convs = [n for n in nir.read(result.artifact).nodes.values() if type(n).__name__ == "Conv2d"]
    dw = next(n for n in convs if n.weight.shape[0] == 4 and n.weight.shape[1] == 4)
    assert int(np.asarray(dw.groups)) == 1 and np.count_nonzero(dw.weight) == 4 * 9  # the other groups' zeros


def test_a_refusal_inside_a_sequential_names_the_module(tmp_path, capsys):
    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.MaxPool2d(2),
                                           torch.nn.Flatten())
            self.s, self.fc = HTAF(), torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.s(self.enc(x)))

    path = tmp_path / "pooled.pt2"
    save_pt2(Pooled().eval(), torch.randn(2, 1, 8, 8), path)
    assert cli.main([str(path), "--target", "nir", "-o", str(tmp_path / "p.nir")]) == 2
    err = capsys.readouterr().err
    assert "MaxPool" in err and "(from module enc.1, test_nir.py:" in err, err


def test_a_constant_scale_inside_the_time_loop_becomes_one_scale_node(tmp_path):
    from htaf_export.nn import LIF

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.lif1, self.out = torch.nn.Linear(16, 12), LIF(0.8, 1.0, "zero"), torch.nn.Linear(12, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v1, acc = torch.zeros(x.shape[0], 12), torch.zeros(x.shape[0], 4)
            for _ in range(3):
                s1, v1 = self.lif1(self.fc1(x) * 3, v1)
                acc = acc + self.out(s1)
            return acc / 3

    torch.manual_seed(0)
    path = tmp_path / "scaled.pt2"
    save_pt2(Scaled().eval(), torch.randn(4, 16), path)
    result = _export(path, tmp_path / "scaled.nir")
    assert result.report.passed, result.report.failure_line()
    assert sorted(_nodes(result.artifact).values()).count("Scale") == 1


class SnntorchLeakyNet(torch.nn.Module):
    """snnTorch's tutorial network with zero-reset ``snn.Leaky`` layers: each computes its reset from the previous
    membrane (a second step a time step) and starts from ``zeros_like`` of its input."""

    def __init__(self, reset: str = "zero") -> None:
        super().__init__()
        snn = pytest.importorskip("snntorch")
        self.fc1, self.fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)
        self.lif1 = snn.Leaky(beta=0.9, threshold=0.75, reset_mechanism=reset)
        self.lif2 = snn.Leaky(beta=0.8, reset_mechanism=reset)

    def _start(self):
        return self.lif1.init_leaky()

    def forward(self, x):
        mem1, mem2, total = self._start(), self.lif2.init_leaky(), 0
        for _ in range(4):
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            total = total + spk2
        return total


def test_snntorch_leaky_layers_become_lif_nodes_that_snntorch_runs_back(tmp_path):
    torch.manual_seed(0)
    save_pt2(SnntorchLeakyNet().eval(), torch.rand(2, 64), tmp_path / "leaky.pt2")
    result = _export(tmp_path / "leaky.pt2", tmp_path / "leaky.nir")
    assert result.report.passed, result.report.failure_line()
    assert {b.backend for b in result.report.backends} == {"nir-sim", "snntorch"}
    assert [r.became for r in result.conversion.rows if r.layer.startswith("lif")] == \
        ["LIF (leak 0.9, zero reset, threshold θ 0.75)", "LIF (leak 0.8, zero reset, threshold θ 1)"]
    assert sum(t.elements for b in result.report.backends for t in b.tensors if t.kind == "binary") > 0


def test_snntorch_leaky_layers_validate_on_tflite_too(tmp_path):
    """Each Leaky's reset step is the previous spike computed again: the TFLite file keeps one tensor for both, and
    the step locator must read the twin from it (sparse spikes let another spike's tensor match on the probes)."""
    torch.manual_seed(0)
    save_pt2(SnntorchLeakyNet().eval(), torch.rand(2, 64), tmp_path / "leaky.pt2")
    with contextlib.redirect_stdout(io.StringIO()):
        result = htaf_export.export(tmp_path / "leaky.pt2", "tflite-float", tmp_path / "leaky.tflite", device="cpu")
    assert result.report.passed, result.report.failure_line()


class SnntorchRecords(SnntorchLeakyNet):
    """The tutorial's return value: every step's spikes and membranes, stacked (``spk_rec``, ``mem_rec``)."""

    def forward(self, x):
        mem1, mem2, spikes, membranes = self.lif1.init_leaky(), self.lif2.init_leaky(), [], []
        for _ in range(4):
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spikes.append(spk2)
            membranes.append(mem2)
        return torch.stack(spikes), torch.stack(membranes)


class SnntorchLapicque(SnntorchLeakyNet):
    """snnTorch's Lapicque with a zero reset: it zeroes β·v + I, input included (was called a subtract reset)."""

    def __init__(self) -> None:
        super().__init__()
        snn = pytest.importorskip("snntorch")
        self.lif1 = snn.Lapicque(beta=0.9, reset_mechanism="zero")

    def _start(self):
        return self.lif1.init_lapicque()


def _per_neuron_leaks(net: SnntorchLeakyNet) -> SnntorchLeakyNet:
    snn = pytest.importorskip("snntorch")
    net.lif1 = snn.Leaky(beta=torch.linspace(0.5, 0.9, 32), learn_beta=True, reset_mechanism="zero")
    return net


def test_a_leak_per_neuron_becomes_a_tau_per_neuron(tmp_path):
    """snnTorch's tensor beta (learn_beta): one leak per neuron, each given back exactly by its τ."""
    torch.manual_seed(0)
    save_pt2(_per_neuron_leaks(SnntorchLeakyNet()).eval(), torch.rand(2, 64), tmp_path / "leaky.pt2")
    result = _export(tmp_path / "leaky.pt2", tmp_path / "leaky.nir")
    assert result.report.passed, result.report.failure_line()
    assert {b.backend for b in result.report.backends} == {"nir-sim", "snntorch"}
    assert [r.became for r in result.conversion.rows if r.layer.startswith("lif")][0] == \
        ("LIF (leak per neuron, 0.5 to 0.9, zero reset, threshold θ 1)")
    nodes = nir.read(result.artifact).nodes
    tau = next(np.asarray(n.tau) for n in nodes.values() if isinstance(n, nir.LIF) and np.asarray(n.tau).size == 32)
    beta = (1.0 - DT / tau).astype(np.float32)
    assert np.array_equal(beta, torch.linspace(0.5, 0.9, 32).numpy())


@pytest.mark.parametrize(("model", "said"), [
    (lambda: SnntorchLeakyNet(reset="subtract"), "subtract reset (v ← v − θ·s) has no exact NIR form"),
    (SnntorchRecords, "a membrane record"),
    (lambda: SnntorchLapicque(), "zeroed after the input is added")])
def test_snntorch_forms_nir_cannot_express_are_refused_for_what_they_are(model, said, tmp_path, capsys):
    """snnTorch's default subtract reset (was "Sub has no NIR node") and a membrane record, each in one line."""
    torch.manual_seed(0)
    path = save_pt2(model().eval(), torch.rand(2, 64), tmp_path / "m.pt2")
    out = tmp_path / "m.nir"
    assert cli.main([str(path), "--target", "nir", "-o", str(out), "--no-validate"]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "\n" not in err and not out.exists()


class ResetSpelling(torch.nn.Module):
    """A plain LIF loop whose reset is written with torch.where, on the membrane's own test or on the spike."""

    def __init__(self, reset: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.reset = torch.nn.Linear(11, 20), torch.nn.Linear(20, 4), reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v1, v2, outs = torch.zeros(x.shape[0], 20), torch.zeros(x.shape[0], 4), []
        for t in range(x.shape[1]):
            v1 = 0.9 * v1 + self.fc1(x[:, t])
            s1 = (v1 >= 1.0).float()
            v1 = torch.where(v1 >= 1.0, 0.0, v1) if self.reset == "zero" else torch.where(s1 > 0, v1 - 1.0, v1)
            v2 = 0.9 * v2 + self.fc2(s1)
            s2 = (v2 >= 1.0).float()
            v2 = v2 * (1 - s2)
            outs.append(s2)
        return torch.stack(outs, dim=1)


@pytest.mark.parametrize("reset", ["zero", "subtract"])
def test_a_reset_written_with_where_is_read_as_the_reset_it_is(tmp_path, reset):
    """where(v >= θ, 0, v) tests the membrane again rather than the spike: refused as 'Add has no NIR node' (the
    leak line); where(s > 0, v − θ, v) is a subtract reset, refused with that reason rather than the Add's."""
    torch.manual_seed(0)
    path = htaf_export.save(ResetSpelling(reset).eval(), tmp_path / "lif.pt2", input_shape=[[6, 11]])
    if reset == "zero":
        assert _export(path, tmp_path / "lif.nir").report.passed
    else:
        with pytest.raises(htaf_export.errors.UnsupportedLayer, match="subtract reset"):
            _export(path, tmp_path / "lif.nir")


def test_conv1d_layers_become_nir_conv1d_nodes(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "audio.pt2"
    save_pt2(AudioSNN().eval(), torch.randn(2, 5, 20), path)
    result = _export(path, tmp_path / "audio.nir")
    assert result.report.passed, result.report.failure_line()
    sim = next(b for b in result.report.backends if b.backend == "nir-sim")
    assert sum(t.kind == "binary" and t.elements > 0 for t in sim.tensors) == 2 * 4
    convs = {n.weight.shape: n for n in nir.read(result.artifact).nodes.values() if type(n).__name__ == "Conv1d"}
    assert set(convs) == {(8, 5, 3), (8, 8, 3)}
    assert int(np.asarray(convs[(8, 5, 3)].stride)) == 2 and int(np.asarray(convs[(8, 8, 3)].dilation)) == 2
