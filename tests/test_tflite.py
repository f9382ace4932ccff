"""TFLite targets: parity of every sample model on both targets (from the CLI), what the files contain,
exact ties, fallbacks, and sabotaged files that validation must reject.

The sample exports run once per (model, target) and are shared by the tests that read them. Tests that
export are marked ``slow``; the whole file takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before anything imports TensorFlow: larq needs Keras 2
if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("larq_compute_engine") is None:
    pytest.skip("TFLite targets need the [tflite] extra", allow_module_level=True)

from htaf_export import cli  # noqa: E402
from htaf_export.harden import harden  # noqa: E402
from htaf_export.io import LoadedModel  # noqa: E402
from htaf_export.nn import HTAF, BinaryConv2d, BinaryLinear  # noqa: E402
from htaf_export.reference import run_reference  # noqa: E402
from htaf_export import metadata as md  # noqa: E402
from htaf_export import tflite_file as tfl  # noqa: E402
from htaf_export.runtimes import tflite as rt  # noqa: E402

from conftest import DIGITS_SAMPLES, SAMPLE_DIR, SAMPLE_NAMES, digits_subset  # noqa: E402

TARGETS = ["tflite", "tflite-float"]
LCE_BACKENDS = {"lce-default", "lce-indirect-bgemm"}
# binary layers with ±1 inputs (bit-packable) in the BNN samples
PACKABLE = {"bnn_mlp": ["layers.fc2", "layers.fc_out"], "bnn_cnn": ["layers.conv2", "layers.conv3", "layers.fc_out"]}


# ---- shared exports -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """``export(name, target) -> (exit code, artifact path, report dict, printed summary)``: each sample is
    exported once via the CLI."""
    out = tmp_path_factory.mktemp("tflite")
    done: dict[tuple[str, str], tuple[int, Path, dict, str]] = {}

    def _export(name: str, target: str):
        if (name, target) not in done:
            artifact = out / f"{name}.{target}.tflite"
            report = out / f"{name}.{target}.json"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                digits = digits_subset(SAMPLE_DIR / f"{name}.pt", out)
                rc = cli.main([str(SAMPLE_DIR / f"{name}.pt"), "--target", target, "-o", str(artifact),
                               "--report", str(report), "--data", str(digits)])
            done[(name, target)] = (rc, artifact, json.loads(report.read_text()) if report.exists() else {},
                                    printed.getvalue())
        return done[(name, target)]

    return _export


def _ops(path: Path) -> list[str]:
    return tfl.op_names(tfl.read_model(path.read_bytes()))


# ---- every sample, both targets ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_passes_parity_from_cli(export, name, target):
    rc, artifact, report, _ = export(name, target)
    assert rc == 0, report.get("first_failure")
    assert report["passed"]
    backends = {b["backend"]: b for b in report["backends"]}
    expected = LCE_BACKENDS if target == "tflite" else {"tflite"}
    assert expected <= set(backends), f"backends run: {sorted(backends)}"
    info = rt.read_tflite_artifact(artifact)
    meta_steps = json.loads(info.metadata["htaf_export.steps"])
    assert len(info.steps) == len(meta_steps) > 0, "every step tensor is read back from the file"
    for b in backends.values():
        assert b["samples"] == DIGITS_SAMPLES and b["argmax_agreement"] == 1.0, "same argmax on every digit"
        binary = [t for t in b["tensors"] if t["kind"] == "binary"]
        assert len(binary) == len(meta_steps) and all(t["unexplained"] == 0 for t in binary)
        floats = [t for t in b["tensors"] if t["kind"] == "float"]
        assert floats and all(t["passed"] for t in floats)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PACKABLE))
def test_bnn_binary_layers_are_bitpacked(export, name):
    _, artifact, _, _ = export(name, "tflite")
    model = tfl.read_model(artifact.read_bytes())
    ops = tfl.op_names(model)
    assert ops.count("LceBconv2d") == len(PACKABLE[name]), ops
    assert "FULLY_CONNECTED" not in ops, f"a binary dense layer stayed a float FULLY_CONNECTED: {ops}"
    graph = model.subgraphs[0]
    int32 = tfl.schema().TensorType.INT32
    for op, op_name in zip(graph.operators, ops):
        if op_name == "LceBconv2d":  # 1-bit weights: int32 words holding 32 channels each
            filt = graph.tensors[int(op.inputs[1])]
            assert filt.type == int32 and tfl.constant_bytes(model, int(op.inputs[1])) * 8 == \
                int(np.prod(filt.shape[:-1])) * 32 * filt.shape[-1]
    meta = tfl.read_metadata(model)
    assert meta[md.TFLITE_LCE_KERNEL] == "indirect_bgemm"  # --lce-kernel auto: a fixed rule, no timings in the file
    assert not any("ms" in key for key in meta)
    # hidden binary layers write bit-packed activations, and validation reads them back unpacked
    encodings = {s["tensor"]: s["encoding"] for s in json.loads(meta[md.TFLITE_OBSERVED])}
    assert list(encodings.values()).count("bitpacked") == len(encodings)


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_float_target_uses_builtin_ops_only(export, name):
    _, artifact, _, _ = export(name, "tflite-float")
    model = tfl.read_model(artifact.read_bytes())
    custom = tfl.schema().BuiltinOperator.CUSTOM
    assert all(max(c.builtinCode, c.deprecatedBuiltinCode) != custom for c in model.operatorCodes), _ops(artifact)
    tf = tfl.tensorflow()
    with tfl.quiet_stderr():
        tf.lite.Interpreter(model_content=artifact.read_bytes()).allocate_tensors()  # the stock interpreter loads it


@pytest.mark.slow
def test_summary_names_ops_sizes_and_reasons(export):
    rc, _, _, out = export("bnn_mlp", "tflite")
    assert rc == 0
    assert "LceBconv2d" in out and "layers.fc1" in out and "real-valued" in out
    assert "1-bit floor" in out and "artifact size" in out


# ---- sabotage: validation must fail ----------------------------------------------------------------


def _flip_first_filter(artifact: Path, op_name: str, out: Path) -> None:
    """Copy ``artifact`` with the first 32 binary weights of the first ``op_name`` layer negated."""
    model = tfl.read_model(artifact.read_bytes())
    graph = model.subgraphs[0]
    op = next(o for o, n in zip(graph.operators, tfl.op_names(model)) if n == op_name)
    buffer = model.buffers[graph.tensors[int(op.inputs[1])].buffer]
    data = np.array(buffer.data, dtype=np.uint8)
    if op_name == "LceBconv2d":
        data[:4] ^= 0xFF  # one packed int32 word: 32 weights change sign
    else:
        weights = data.view(np.float32)
        weights[:32] *= -1
    buffer.data = data
    out.write_bytes(tfl.write_model(model))


@pytest.mark.slow
@pytest.mark.parametrize(("target", "op_name"), [("tflite", "LceBconv2d"), ("tflite-float", "CONV_2D")])
def test_sabotaged_weights_fail_validation(export, tmp_path, target, op_name):
    _, artifact, _, _ = export("bnn_cnn", target)
    bad = tmp_path / "sabotaged.tflite"
    _flip_first_filter(artifact, op_name, bad)
    assert cli.main(["validate", str(SAMPLE_DIR / "bnn_cnn.pt"), str(bad), "--data",
                     str(digits_subset(SAMPLE_DIR / "bnn_cnn.pt", tmp_path))]) == 1


def test_not_an_htaf_file_is_bad_input(tmp_path):
    path = tmp_path / "x.tflite"
    path.write_bytes(b"not a flatbuffer at all")
    assert cli.main(["validate", str(SAMPLE_DIR / "bnn_cnn.pt"), str(path)]) == 2


# ---- built models: ties, padding, fallbacks ------------------------------------------------------


class TinyBNN(nn.Module):
    """sign(x) → binary conv (pad +1) → BN → sign → binary conv (``pad_value``, ``stride``) → BN → sign → dense → BN."""

    def __init__(self, pad_value: float = 1.0, stride: int = 1, depthwise: bool = False, tie: str = "ge",
                 size: int = 8) -> None:
        super().__init__()
        self.input_shape = [8, size, size]
        self.act0 = HTAF(levels="pm1", mode="surrogate", tie=tie)
        self.conv1 = BinaryConv2d(8, 16, 3, padding=1, pad_value=1.0)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = HTAF(levels="pm1", mode="surrogate", tie=tie)
        if depthwise:
            self.conv2: nn.Module = nn.Conv2d(16, 16, 3, stride=stride, padding=1, groups=16, bias=False)
            with torch.no_grad():
                self.conv2.weight.copy_(torch.where(torch.randn_like(self.conv2.weight) >= 0, 1.0, -1.0))
        else:
            self.conv2 = BinaryConv2d(16, 16, 3, stride=stride, padding=1, pad_value=pad_value)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = HTAF(levels="pm1", mode="surrogate", tie=tie)
        out = (size - 1) // stride + 1
        self.fc = BinaryLinear(16 * out * out, 10)
        self.bn3 = nn.BatchNorm1d(10)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(self.act0(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.flatten(1)))


def tiny(ties: bool = False, **kw) -> TinyBNN:
    """A TinyBNN with random batch norms; ``ties`` puts BN means on even integers with β = 0, so that many
    pre-activations land exactly on the threshold (the conv sums are even integers here)."""
    torch.manual_seed(1)
    model = TinyBNN(**kw)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.randn(n, generator=g)
            m.bias.data = torch.zeros(n) if ties else torch.randn(n, generator=g)
            m.running_mean.data = (torch.randint(-6, 7, (n,), generator=g) * 2.0 if ties
                                   else torch.randn(n, generator=g) * 3)
            m.running_var.data = torch.rand(n, generator=g) * 4 + 0.5
    return model.eval()


def _convert(model: nn.Module, target: str, tmp_path: Path, tie: str | None = None) -> Path:
    from htaf_export.capture import capture
    from htaf_export.pipeline import convert
    from htaf_export.targets import TARGETS, ExportOptions

    hardened = harden(model, tie=tie).model
    cap = capture(hardened, model.input_shape, ["logits"])
    art = convert(cap, TARGETS[target], {md.TARGET: target}, ExportOptions(), hardened)
    path = tmp_path / f"tiny.{target}.tflite"
    path.write_bytes(art.data)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("tie", ["ge", "gt"])
@pytest.mark.parametrize("target", TARGETS)
def test_exact_ties_are_bit_exact(tmp_path, target, tie):
    """On inputs where batch norm puts pre-activations exactly on the threshold, every step bit equals the
    reference's, with no allowance for rounding, on every interpreter (both LCE kernels)."""
    model = tiny(ties=True, tie=tie)
    info = rt.read_tflite_artifact(_convert(model, target, tmp_path))
    x = np.random.default_rng(0).standard_normal((64, *model.input_shape)).astype(np.float32)
    ref = run_reference(harden(model).model, (torch.from_numpy(x),), ["logits"])
    hidden = [s for s in info.steps if s.site in ("act1", "act2")]
    assert len(hidden) == 2
    ties = sum(int((np.abs(ref.preactivations[(s.site, 0)]) <= 1e-6).sum()) for s in hidden)
    assert ties > 1000, "the test must exercise ties"
    for runner in rt.tflite_runners(info, "cpu"):
        got = runner.run({info.input_names[0]: x})
        for s in info.steps:
            np.testing.assert_array_equal(got[s.tensor], ref.steps[(s.site, 0)], err_msg=f"{runner.name} {s.tensor}")
        np.testing.assert_allclose(got["logits"], ref.outputs["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("kw", "became", "why"), [
    (dict(pad_value=0.0, stride=2), "CONV_2D (float", "zero padding of ±1 activations"),
    (dict(depthwise=True), "DEPTHWISE_CONV_2D (float", "no binary depthwise"),
    (dict(pad_value=0.0), "LceBconv2d", "pad_values=0"),
    (dict(pad_value=1.0, stride=2), "LceBconv2d", "explicit PADV2"),
    (dict(pad_value=1.0, stride=2, size=9), "LceBconv2d", "pad_values=1"),
])
def test_binary_layers_lce_cannot_pack_as_is_are_exact_and_explained(tmp_path, kw, became, why):
    from htaf_export.pipeline import export as export_api

    model = tiny(**kw)
    loaded = LoadedModel(model, list(model.input_shape), "checkpoint", tmp_path / "tiny.pt", "0", "bnn")
    result = export_api(loaded, "tflite", tmp_path / "tiny.tflite", device="cpu")
    row = next(r for r in result.conversion.rows if r.layer == "conv2")
    assert row.became.startswith(became) and why in row.note, row
    if became.startswith(("CONV_2D", "DEPTHWISE")):
        assert "fell back to float" in row.note
    assert result.report is not None and result.report.passed, result.report.failure_line()


class PaddedStride2(nn.Module):
    """F.pad(x, 1) then a stride-2 conv on an even input: LCE's converter fuses such a pad into a SAME conv,
    which pads (0, 1) rather than (1, 1), unless the padding no output reads is trimmed first."""

    def __init__(self) -> None:
        super().__init__()
        self.input_shape = [3, 8, 8]
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.act = HTAF(levels="01", mode="smooth")
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.act(self.conv(torch.nn.functional.pad(x, (1, 1, 1, 1)))).flatten(1))


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_explicit_pad_before_stride_2_conv_is_kept_exact(tmp_path, target):
    torch.manual_seed(0)
    model = PaddedStride2().eval()
    info = rt.read_tflite_artifact(_convert(model, target, tmp_path))
    x = np.random.default_rng(0).standard_normal((32, *model.input_shape)).astype(np.float32)
    ref = run_reference(harden(model).model, (torch.from_numpy(x),), ["logits"])
    for runner in rt.tflite_runners(info, "cpu"):
        got = runner.run({info.input_names[0]: x})
        np.testing.assert_allclose(got["logits"], ref.outputs["logits"], rtol=1e-5, atol=1e-5, err_msg=runner.name)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_traced_bnn_programs_are_bitpacked(tmp_path, fmt):
    """TorchScript's exporter folds each batch norm into the conv before it: the ±1 weights arrive scaled per
    channel (±s), and must still become bit-packed layers with exact thresholds."""
    import htaf_export
    from htaf_export.pipeline import export as export_api

    loaded = htaf_export.load(SAMPLE_DIR / "bnn_cnn.pt")
    hardened = harden(loaded.module).model
    hardened.input_shape, hardened.family, hardened.output_names = loaded.input_shape, "bnn", loaded.output_names
    source = htaf_export.save(hardened, tmp_path / f"m.{fmt}", format=fmt)
    result = export_api(source, "tflite", tmp_path / "m.tflite", device="cpu")
    assert result.report is not None and result.report.passed, result.report.failure_line()
    assert _ops(result.artifact).count("LceBconv2d") == len(PACKABLE["bnn_cnn"])


# ---- pieces --------------------------------------------------------------------------------------


def test_unpack_bits_follows_lce_layout():
    rng = np.random.default_rng(0)
    signs = np.where(rng.random((3, 4, 70)) < 0.5, -1.0, 1.0).astype(np.float32)
    bits = np.concatenate([(signs < 0), np.zeros((3, 4, 26), bool)], axis=-1).astype(np.uint8)  # pad to 96
    words = np.packbits(bits.reshape(3, 4, 3, 32), axis=-1, bitorder="little").view("<i4")[..., 0]
    np.testing.assert_array_equal(tfl.unpack_bits(words, 70), signs)


def test_trim_padding_keeps_only_rows_an_output_reads():
    from htaf_export.converters.tflite_binary import trim_padding

    assert trim_padding(8, 3, 2, 1, 1) == 0  # PyTorch's (1, 1) at stride 2 reads only (1, 0)
    assert trim_padding(9, 3, 2, 1, 1) == 1
    assert trim_padding(8, 3, 1, 1, 1) == 1


def test_integer_thresholds_match_brute_force():
    """The per-channel rule found for a BN → step chain agrees with evaluating the chain on every integer."""
    import onnx_ir as ir

    from htaf_export.converters.integer_thresholds import integer_thresholds

    rng = np.random.default_rng(0)
    c, k = 6, 18
    params = [rng.standard_normal(c).astype(np.float32) * s for s in (1, 1, 4)] + \
             [rng.random(c).astype(np.float32) + 0.1]
    params[0][0] = -abs(params[0][0])  # one falling channel
    x = ir.Value(name="x")
    consts = [ir.Value(name=f"p{i}", const_value=ir.tensor(p)) for i, p in enumerate(params)]
    bn = ir.node("BatchNormalization", [x, *consts], {"epsilon": 1e-5})
    theta = ir.Value(name="t", const_value=ir.tensor(np.array(0.0, np.float32)))
    step = ir.node("Sign", [bn.outputs[0], theta], {"tie": "gt"}, domain="htaf")
    flip, threshold = integer_thresholds([(bn, 0)], step, None, k, c, 2)
    v = np.arange(-k, k + 1, dtype=np.float32)[:, None]
    y = torch.nn.functional.batch_norm(torch.from_numpy(np.repeat(v, c, 1)), *(torch.from_numpy(p) for p in
                                       (params[2], params[3], params[0], params[1])), False, 0.0, 1e-5).numpy()
    assert flip[0] == -1
    np.testing.assert_array_equal(flip * v >= threshold, y > 0)


def test_core_import_does_not_load_tensorflow():
    code = "import htaf_export, htaf_export.pipeline, htaf_export.cli, sys; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _move_threshold(artifact: Path, op_name: str, input_index: int, out: Path, step) -> None:
    """Copy ``artifact`` with channel 0 of the first ``op_name`` op's constant input moved by ``step``."""
    model = tfl.read_model(artifact.read_bytes())
    graph = model.subgraphs[0]
    op = next(o for o, n in zip(graph.operators, tfl.op_names(model))
              if n == op_name and len(o.inputs) > input_index and o.inputs[input_index] >= 0
              and model.buffers[graph.tensors[int(o.inputs[input_index])].buffer].data is not None)
    buffer = model.buffers[graph.tensors[int(op.inputs[input_index])].buffer]
    data = np.array(buffer.data, dtype=np.uint8)
    values = data.view(np.int32 if op_name == "LceBconv2d" else np.float32)
    values[0] += step
    buffer.data = data
    out.write_bytes(tfl.write_model(model))


@pytest.mark.slow
def test_bitpacked_threshold_moved_one_step_fails_and_names_the_step(export, tmp_path, capsys):
    _, artifact, _, _ = export("bnn_cnn", "tflite")
    bad = tmp_path / "threshold.tflite"
    _move_threshold(artifact, "LceBconv2d", 4, bad, 1)  # LceBconv2d input 4: integer output thresholds
    capsys.readouterr()
    assert cli.main(["validate", str(SAMPLE_DIR / "bnn_cnn.pt"), str(bad), "--data",
                     str(digits_subset(SAMPLE_DIR / "bnn_cnn.pt", tmp_path))]) == 1
    assert "first failing tensor layers.act2" in capsys.readouterr().out.replace("\n", " ")


@pytest.mark.slow
def test_float_threshold_moved_fails_and_names_the_step(export, tmp_path, capsys):
    _, artifact, _, _ = export("dhn_mlp", "tflite-float")
    bad = tmp_path / "threshold.tflite"
    _move_threshold(artifact, "GREATER_EQUAL", 1, bad, np.float32(0.05))
    capsys.readouterr()
    assert cli.main(["validate", str(SAMPLE_DIR / "dhn_mlp.pt"), str(bad), "--data",
                     str(digits_subset(SAMPLE_DIR / "dhn_mlp.pt", tmp_path))]) == 1
    assert "first failing tensor layers.act1" in capsys.readouterr().out.replace("\n", " ")
