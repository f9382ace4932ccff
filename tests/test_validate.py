"""Validation: clean artifacts pass, sabotage is caught and named, ties are crafted and checked, bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import htaf_export
from htaf_export import cli
from htaf_export.crafted import craft
from htaf_export.data import digits
from htaf_export.harden import harden
from htaf_export.pipeline import default_data, export, validate_file
from htaf_export.reference import record_steps
from htaf_export.runtimes import read_artifact
from htaf_export.runtimes.torch_cuda import TorchRunner
from htaf_export.testing import assert_parity
from htaf_export.data import NpzBatches
from htaf_export.parity import MARGIN_EDGES
from htaf_export.validate import validate

from conftest import tie_twin  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
NAMES = ["bnn_mlp", "bnn_cnn", "dhn_mlp", "snn_mlp", "icbm_cnn"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every sample exported to ONNX once, with the automatic validation that export runs."""
    out = tmp_path_factory.mktemp("validate")
    return {name: export(SAMPLES / f"{name}.pt", "onnx", out / f"{name}.onnx", device="cpu") for name in NAMES}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, " ".join(captured.out.split()), captured.err


def rewrite(src: Path, dst: Path, edit) -> Path:
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


def initializer(proto: onnx.ModelProto, name: str) -> tuple[onnx.TensorProto, np.ndarray]:
    init = next(i for i in proto.graph.initializer if i.name == name)
    return init, numpy_helper.to_array(init).copy()


def replace(init: onnx.TensorProto, array: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(array, init.name))


def own_threshold(proto: onnx.ModelProto, step_tensor: str, change) -> None:
    """Give one step node its own threshold initializer, changed by ``change(array) -> array``."""
    node = next(n for n in proto.graph.node if n.output[0] == step_tensor)
    _, array = initializer(proto, node.input[1])
    name = f"{step_tensor}.sabotaged_threshold"
    proto.graph.initializer.append(numpy_helper.from_array(change(array).astype(np.float32), name))
    node.input[1] = name


# ---- clean artifacts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_clean_artifact_passes_with_zero_unexplained_flips(exported, name):
    report = exported[name].report
    assert report is not None and report.passed, report.failure_line()
    assert report.backends[0].backend == "onnxruntime-cpu"
    for b in report.backends:
        binary = [t for t in b.tensors if t.kind == "binary"]
        assert binary and all(t.observed for t in binary)
        assert sum(t.unexplained for t in b.tensors) == 0
        assert sum(t.tie_violations for t in b.tensors) == 0
        assert b.crafted.samples == report.crafted["samples"] > 0
        assert b.samples == 1797 and b.labelled == 1797
    # Crafted inputs put pre-activations on or within float rounding of every first-layer threshold.
    first = report.backends[0].tensors[0]
    assert first.min_margin is not None and first.min_margin < 1e-6


def test_spiking_model_gets_certified_exact_ties_that_the_artifact_reproduces(exported):
    report = exported["snn_mlp"].report
    crafted = report.crafted
    assert crafted["exact_ties"] >= 50 and crafted["certified_ties"] >= 10
    t0 = report.backends[0].tensor("lifs.0.spike@0")
    assert t0.certified_ties == crafted["certified_ties"]
    assert t0.exact_ties >= crafted["by_site"]["lifs.0.spike"]["tie"]
    assert t0.tie_flips == 0 and t0.tie_violations == 0


def test_crafted_inputs_do_not_depend_on_the_machines_speed(load_sample, monkeypatch):
    """The same model gets the same crafted inputs on a slow or busy machine: the work budget is counted."""
    import htaf_export.crafted as crafted_module

    loaded = load_sample("bnn_cnn")
    model = harden(loaded.module).model
    normal = craft(model, loaded.input_shape)
    clock = iter(range(10**6))
    monkeypatch.setattr(crafted_module.time, "perf_counter", lambda: float(next(clock)))  # every call: 1 s later
    slow = craft(model, loaded.input_shape)
    assert len(normal.x) > 0 and np.array_equal(normal.x, slow.x)
    monkeypatch.setattr(crafted_module, "BUDGET_FLOPS", 1.0)  # a model too costly to search fully: fewer searches
    cut = craft(model, loaded.input_shape)
    assert 0 < len(cut.x) < len(normal.x) and any("costly" in n for n in cut.notes)


def test_crafted_roles_are_measured_not_assumed(load_sample):
    loaded = load_sample("snn_mlp")
    model = harden(loaded.module).model
    crafted = craft(model, loaded.input_shape, digits("all", loaded.input_shape).x[:4])
    with torch.no_grad(), record_steps(model) as calls:
        model(torch.from_numpy(crafted.x))
    pre = {(c.site, c.call): c.pre.reshape(len(crafted.x), -1).numpy() for c in calls}
    assert crafted.exact_ties > 0 and crafted.certified_ties > 0
    for p in crafted.points:
        u = pre[(p.site, p.call)][p.sample, p.unit]
        assert u == p.pre
        assert (u == 0) == (p.role == "tie")
        if p.certified:
            assert p.role == "tie" and p.family == "single-term" and np.count_nonzero(crafted.x[p.sample]) == 1
        if p.role == "below":
            assert u < 0
        if p.role == "above":
            assert u > 0


def test_batch_norm_sites_get_nearest_float_ties(load_sample):
    """Torch evaluates batch norm with a fused multiply-add: no float input reaches u = 0 exactly there."""
    loaded = load_sample("dhn_mlp")
    crafted = craft(harden(loaded.module).model, loaded.input_shape, digits("all", loaded.input_shape).x[:4])
    assert crafted.certified_ties == 0 and len(crafted) > 0
    near = [abs(p.pre) for p in crafted.points if p.role == "near"]
    assert near and np.median(near) < 1e-6
    assert any("fused multiply-add" in n for n in crafted.notes)


def test_margin_histograms_are_bounded_and_complete(exported):
    report = exported["bnn_cnn"].report
    backend = report.backends[0]
    for t in backend.tensors:
        if t.kind != "binary":
            continue
        hist = report.margins[t.name]
        assert len(hist.counts) == len(MARGIN_EDGES)  # exactly 0, then one bin above each edge
        # Every unit of every sample (data and crafted) is counted; nothing is kept per sample.
        total, samples = sum(hist.counts), backend.data.samples + backend.crafted.samples
        units = total // samples
        assert units * samples == total and t.elements == total - t.excused_samples * units


# ---- sabotage --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight,expected", [("layers.conv1", "layers.act1"), ("layers.conv2", "layers.act2"),
                                             ("layers.conv3", "layers.act3"), ("layers.fc_out", "logits")])
def test_one_flipped_weight_bit_fails_and_names_the_layer(exported, tmp_path, capsys, weight, expected):
    def flip(proto):
        init, packed = initializer(proto, f"{weight}.weight.packed")
        packed.reshape(-1)[0] ^= 0x01
        replace(init, packed)

    bad = rewrite(exported["bnn_cnn"].artifact, tmp_path / "flipped.onnx", flip)
    code, out, err = run_cli(capsys, "validate", SAMPLES / "bnn_cnn.pt", bad, "--device", "cpu")
    assert code == 1, out
    assert f"first failing tensor {expected}" in out
    if expected != "logits":
        assert f"fed by layer {weight}" in out


def test_threshold_moved_one_integer_step_fails_and_names_the_step(exported, tmp_path, capsys):
    """conv2 sums 288 products of ±1, so its pre-activations are even integers: one lattice step is 2. Its
    batch norm and sign are an integer threshold T, carried by the conv's bias ½ − T."""
    def move(proto):
        init, bias = initializer(proto, "layers.conv2.bias")
        bias.reshape(-1)[5] -= 2.0
        replace(init, bias)

    bad = rewrite(exported["bnn_cnn"].artifact, tmp_path / "moved.onnx", move)
    code, out, _ = run_cli(capsys, "validate", SAMPLES / "bnn_cnn.pt", bad, "--device", "cpu")
    assert code == 1 and "first failing tensor layers.act2" in out


def test_real_threshold_moved_beyond_rounding_fails(exported, tmp_path, capsys):
    def move(proto):
        init, t = initializer(proto, "layers.act1.threshold")
        t.reshape(-1)[3] += 0.01
        replace(init, t)

    bad = rewrite(exported["dhn_mlp"].artifact, tmp_path / "moved.onnx", move)
    code, out, _ = run_cli(capsys, "validate", SAMPLES / "dhn_mlp.pt", bad, "--device", "cpu")
    assert code == 1 and "first failing tensor layers.act1" in out


def test_threshold_moved_one_float_step_is_caught_on_certified_ties(exported, tmp_path, capsys):
    bad = rewrite(exported["snn_mlp"].artifact, tmp_path / "moved.onnx",
                  lambda proto: own_threshold(proto, "lifs.0.spike@0", lambda t: np.nextafter(t, np.float32(2))))
    report = tmp_path / "r.json"
    code, out, _ = run_cli(capsys, "validate", SAMPLES / "snn_mlp.pt", bad, "--device", "cpu", "--report", report)
    assert code == 1 and "first failing tensor lifs.0.spike@0" in out
    data = json.loads(report.read_text())
    first = data["backends"][0]["tensors"][0]
    assert first["name"] == "lifs.0.spike@0" and first["tie_violations"] == first["certified_ties"] > 0


def test_one_float_step_on_a_folded_threshold_is_within_rounding(exported, tmp_path, capsys):
    """A batch norm folded into a threshold is rounded once; one float step more is the same kind of
    rounding, and the parity rules explain it. (Documented limit: no input can tell them apart.)"""
    def move(proto):
        init, t = initializer(proto, "layers.act1.threshold")
        replace(init, np.nextafter(t, np.float32(np.inf)).astype(np.float32))

    bad = rewrite(exported["dhn_mlp"].artifact, tmp_path / "ulp.onnx", move)
    code, out, _ = run_cli(capsys, "validate", SAMPLES / "dhn_mlp.pt", bad, "--device", "cpu")
    assert code == 0, out


# ---- tie rule --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snn_gt_model(tmp_path_factory):
    """The SNN sample with the same weights, its spikes declaring tie gt."""
    return tie_twin("snn_mlp", "gt", tmp_path_factory.mktemp("twin"))


@pytest.fixture(scope="module")
def snn_gt(snn_gt_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tie") / "snn_gt.onnx"
    export(snn_gt_model, "onnx", out, validate_artifact=False)
    return out


def test_tie_mismatch_is_caught_on_crafted_ties(snn_gt, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "validate", SAMPLES / "snn_mlp.pt", snn_gt, "--device", "cpu")
    assert code == 1 and "first failing tensor lifs.0.spike@0" in out and "certified ties" in out


def test_tie_mismatch_is_caught_by_behaviour_even_when_the_file_claims_the_right_rule(snn_gt, tmp_path, capsys):
    """A converter that writes `>` but records 'ge' is caught by the crafted ties, not by metadata."""
    def lie(proto):
        for p in proto.metadata_props:
            if p.key == "htaf_export.tie":
                p.value = "ge"

    liar = rewrite(snn_gt, tmp_path / "liar.onnx", lie)
    report = tmp_path / "r.json"
    code, out, _ = run_cli(capsys, "validate", SAMPLES / "snn_mlp.pt", liar, "--device", "cpu", "--report", report)
    assert code == 1
    data = json.loads(report.read_text())
    assert data["tie_rule"] == {"reference": "ge", "artifact": "ge"}
    assert data["first_failure"]["tensor"] == "lifs.0.spike@0"
    assert data["backends"][0]["tensors"][0]["tie_violations"] > 0


def test_matching_tie_rule_passes(snn_gt, snn_gt_model, capsys):
    code, out, _ = run_cli(capsys, "validate", snn_gt_model, snn_gt, "--device", "cpu")
    assert code == 0, out


def test_tie_option_conflicting_with_the_declared_rule_is_an_error(snn_gt, capsys):
    code, _, err = run_cli(capsys, "validate", SAMPLES / "snn_mlp.pt", snn_gt, "--tie", "gt", "--device", "cpu")
    assert code == 2 and "conflicts with the tie rule the model declares" in err


def test_declared_tie_rule_mismatch_fails_where_no_input_reaches_a_tie(tmp_path, capsys):
    art = tmp_path / "dhn_gt.onnx"
    export(tie_twin("dhn_mlp", "gt", tmp_path), "onnx", art, validate_artifact=False)
    code, out, _ = run_cli(capsys, "validate", SAMPLES / "dhn_mlp.pt", art, "--device", "cpu")
    assert code == 1 and "tie rule 'gt'" in out


# ---- backends ----------------------------------------------------------------------------------------------


def test_torch_runner_plumbing_on_cpu(exported, load_sample):
    """The runner behind torch-cuda, run on the CPU: the module's own forward against the reference (the
    traced program, interpreted with its rounding bounds): every flipped bit is a rounding, every float is
    within its bound."""
    loaded = load_sample("bnn_cnn")
    hardening = harden(loaded.module)
    info = read_artifact(exported["bnn_cnn"].artifact)
    runner = TorchRunner(hardening.model, info, "cpu")
    report = validate(hardening.model, info, [runner], default_data(loaded.input_shape, None), "bnn_cnn")
    assert report.passed and report.backends[0].backend == "torch-cpu"
    assert all(t.elements > 0 and t.mismatched == t.explained for t in report.backends[0].tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_backends_pass(exported, capsys):
    for name in NAMES:
        code, out, _ = run_cli(capsys, "validate", SAMPLES / f"{name}.pt", exported[name].artifact, "--device", "cuda")
        assert code == 0, out
        assert "torch-cuda" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_a_gpu_is_bad_input(exported, capsys):
    code, _, err = run_cli(capsys, "validate", SAMPLES / "dhn_mlp.pt", exported["dhn_mlp"].artifact, "--device", "cuda")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "no runtime on this machine" in lines[0]


# ---- data ---------------------------------------------------------------------------------------------------


def test_user_data_is_streamed_in_batches(tmp_path, exported, npz_file):
    ds = digits("test", [64])
    path = npz_file("d.npz", x=ds.x, y=ds.y)
    source = NpzBatches(path, [64])
    sizes = [len(x) for x, _ in source.batches(100)]
    assert sizes == [100] * (len(ds.x) // 100) + [len(ds.x) % 100]
    x_all = np.concatenate([x for x, _ in source.batches(128)])
    np.testing.assert_array_equal(x_all, ds.x)
    compressed = tmp_path / "c.npz"
    np.savez_compressed(compressed, x=ds.x.reshape(-1, 8, 8), y=ds.y)
    report = validate_file(harden(htaf_export.load(SAMPLES / "dhn_mlp.pt").module),
                           read_artifact(exported["dhn_mlp"].artifact), NpzBatches(compressed, [64]), "dhn", "cpu")
    assert report.passed and report.backends[0].labelled == len(ds.x)


def bad_input_cases(tmp_path: Path, exported) -> list[list]:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx file at all")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])])
    onnx.save(helper.make_model(graph), str(foreign))
    wrong_shape = tmp_path / "wrong.npz"
    np.savez(wrong_shape, x=np.zeros((10, 63), np.float32))
    dhn = SAMPLES / "dhn_mlp.pt"
    art = exported["dhn_mlp"].artifact
    return [
        ["validate", dhn, tmp_path / "missing.onnx"],
        ["validate", dhn, garbage],
        ["validate", dhn, text],
        ["validate", dhn, foreign],
        ["validate", dhn, art, "--data", wrong_shape],
        ["validate", dhn, art, "--report", tmp_path / "r.txt"],
        ["validate", SAMPLES / "bnn_cnn.pt", art],  # an artifact of another model
        [dhn, "--target", "onnx", "-o", tmp_path / "x.onnx", "--report", tmp_path / "r.pdf"],
    ]


def test_bad_input_gives_exit_2_and_one_line(tmp_path, exported, capsys):
    for argv in bad_input_cases(tmp_path, exported):
        code, out, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2, (argv, out, err)
        assert len(lines) == 1 and lines[0].startswith("htaf-export: error:"), (argv, err)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "r.txt").exists()


# ---- assert_parity --------------------------------------------------------------------------------------------


def test_assert_parity_passes_on_a_clean_artifact(exported, load_sample):
    report = assert_parity(SAMPLES / "icbm_cnn.pt", exported["icbm_cnn"].artifact)
    assert report.passed
    loaded = load_sample("dhn_mlp")
    ds = digits("test", loaded.input_shape)
    assert assert_parity(loaded.module, exported["dhn_mlp"].artifact, (ds.x[:200], ds.y[:200]), atol=1e-4).passed


def test_assert_parity_names_the_layer_on_a_sabotaged_artifact(exported, tmp_path):
    def flip(proto):
        init, packed = initializer(proto, "layers.fc2.weight.packed")
        packed.reshape(-1)[:4] ^= 0xFF
        replace(init, packed)

    bad = rewrite(exported["bnn_mlp"].artifact, tmp_path / "bad.onnx", flip)
    with pytest.raises(AssertionError, match=r"onnxruntime-cpu: first failing tensor layers\.act2 "
                                             r"\(fed by layer layers\.fc2\)"):
        assert_parity(SAMPLES / "bnn_mlp.pt", bad)


def test_torch_export_program_is_a_full_reference(exported, load_sample, tmp_path):
    """A .pt2 program has no Step modules to hook: its steps are read off the graph's comparisons."""
    loaded = load_sample("snn_mlp")
    hard = harden(loaded.module).model
    hard.input_shape = loaded.input_shape
    program = htaf_export.load(htaf_export.save(hard, tmp_path / "snn.pt2", format="pt2"))
    report = validate_file(harden(program.module), read_artifact(exported["snn_mlp"].artifact),
                           default_data(loaded.input_shape, None), "snn.pt2", "cpu")
    assert report.passed, report.failure_line()
    tensors = report.backends[0].tensors
    assert all(t.observed for t in tensors) and not report.notes
    assert report.crafted["certified_ties"] > 0 and report.tie_rule["reference"] == "ge"


def test_margin_histogram_bins_every_value_once():
    """Zero alone, each decade by its upper edge (inclusive, in float32 as in float64), and above 1e3."""
    from htaf_export.parity import MarginHistogram

    values = np.array([0.0, -0.0, 1e-12, 1e-3, -1e-3 * 1.0001, 0.5, 1.0, -1000.0, 1000.5, 1e9], np.float32)
    for dtype in (np.float32, np.float64):
        h = MarginHistogram("t")
        h.add(values.astype(dtype))
        assert sum(h.counts) == len(values)
        assert h.counts[0] == 2 and h.counts[1] == 1 and h.counts[-1] == 2
        # float32(1e-3) lies just above 1e-3: it shares the next bin with −1.0001e-3
        assert h.counts[MARGIN_EDGES.index(1e-3)] == 0 and h.counts[MARGIN_EDGES.index(1e-2)] == 2
        assert h.counts[MARGIN_EDGES.index(1.0)] == 2 and h.counts[MARGIN_EDGES.index(1000.0)] == 1


def test_a_torchscript_reference_takes_its_steps_from_its_captured_graph(tmp_path):
    """TorchScript exposes no intermediate tensors: its steps are read from its captured graph (run in ONNX
    Runtime), so they are compared bit for bit and a flip is judged by its margin; a sabotaged weight fails at
    the step it feeds, not only at the logits."""
    from htaf_export.nn import HTAF

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 24), HTAF(2.0, 4.0, threshold=0.1, levels="01"),
                                torch.nn.Linear(24, 10)).eval()
    path = tmp_path / "m.torchscript"
    torch.jit.save(torch.jit.trace(model, torch.zeros(2, 64)), str(path))
    result = export(path, "onnx", tmp_path / "m.onnx", input_shape=[64], device="cpu")
    assert result.report.passed, result.report.failure_line()
    steps = [t for t in result.report.backends[0].tensors if t.kind == "binary"]
    assert steps and all(t.observed and t.elements == 1797 * 24 for t in steps)
    assert any("captured graph run in ONNX Runtime" in n for n in result.report.notes)

    proto = onnx.load(str(result.artifact))
    weight = next(i for i in proto.graph.initializer if i.name.endswith("0.weight"))
    array = numpy_helper.to_array(weight).copy()
    array[5] *= -1  # one unit's weights flip sign
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    report = validate_file(result.hardening, read_artifact(bad), digits("all"), "m", "cpu", input_shape=[64])
    assert not report.passed and report.first_failure[1] == steps[0].name


def test_bad_data_found_while_validating_leaves_no_file(tmp_path, capsys):
    """A NaN deep in the user's data is found only while validation streams it: the file written just before
    is removed, so exit 2 never leaves an unvalidated artifact behind."""
    x = digits("all", [64]).x[:40].copy()
    x[37, 5] = np.nan
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    out = tmp_path / "m.onnx"
    sample = Path(__file__).resolve().parent.parent / "sample_models" / "dhn_mlp.pt"
    assert cli.main([str(sample), "--target", "onnx", "-o", str(out), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and err.count("\n") == 1
    assert not out.exists()


def test_validating_against_another_model_file_says_so(tmp_path, capsys):
    """Same architecture, other weights: parity fails, and the report says the artifact came from another file."""
    samples = Path(__file__).resolve().parent.parent / "sample_models"
    artifact = tmp_path / "dhn.onnx"
    assert cli.main([str(samples / "dhn_mlp.pt"), "--target", "onnx", "-o", str(artifact), "--no-validate"]) == 0
    other = htaf_export.load(samples / "dhn_mlp.pt").module
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.0)
    path = htaf_export.save(other, tmp_path / "other.pt")
    capsys.readouterr()
    assert cli.main(["validate", str(path), str(artifact)]) == 1
    out = capsys.readouterr().out.replace("\n", " ")
    assert "exported from another file" in " ".join(out.split()), out


def test_labels_that_are_not_classes_of_the_output_give_no_accuracy(tmp_path):
    """A 4-class model on the bundled digits (labels 0..9): no "accuracy" of 10 % is reported."""
    from htaf_export.nn import HTAF

    model = torch.nn.Sequential(torch.nn.Linear(64, 16), HTAF(levels="01"), torch.nn.Linear(16, 4)).eval()
    path = htaf_export.save(model, tmp_path / "four.pt2", input_shape=[64])
    report = htaf_export.export(path, "onnx", tmp_path / "four.onnx", device="cpu").report
    assert report.passed and all(b.labelled == 0 for b in report.backends)


def test_a_flip_on_an_exactly_computed_tie_is_a_tie_violation():
    """A pre-activation that is 0 with a bound of 0 (an integer sum) is a tie every implementation computes: the
    declared rule alone decides, so a flip there is a violation, not rounding; with a bound above 0 it is rounding."""
    from htaf_export.compare import compare_binary
    from htaf_export.parity import TensorResult

    ref, got = np.array([[1.0, 1.0, -1.0]]), np.array([[-1.0, 1.0, 1.0]])
    pre = np.array([[0.0, 3.0, -1e-7]], np.float32)
    exact = TensorResult("s", "binary")
    compare_binary(exact, ref, got, pre, None, np.zeros(1, bool), np.zeros((1, 3), np.float32), "data", 0)
    assert (exact.tie_violations, exact.explained) == (1, 0)
    rounded = TensorResult("s", "binary")
    compare_binary(rounded, ref, got, pre, None, np.zeros(1, bool), np.full((1, 3), 1e-6, np.float32), "data", 0)
    assert (rounded.tie_violations, rounded.explained) == (0, 2)


def test_an_output_no_sample_reached_is_said_to_be_uncompared():
    from htaf_export.parity import BackendResult, TensorResult, uncompared_outputs

    reached = TensorResult("logits", "float", elements=40, excused_samples=2)
    excused = TensorResult("aux", "float", elements=0, excused_samples=12)
    note = uncompared_outputs([BackendResult("b", "cpu", [reached, excused])])
    assert note is not None and "no value of output aux was compared" in note and "logits" not in note
    assert uncompared_outputs([BackendResult("b", "cpu", [reached])]) is None
