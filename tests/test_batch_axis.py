"""A spiking network written time first, as snnTorch's tutorials feed it: input [T, N, F], output [T, N, C].
Saved as a .pt2 with the batch dynamic on axis 1, or pickled; exported batch-first, validated on the real
runtimes, and the note says how to feed the artifact. A batch-first model that is also independent along
axis 1 is left as it is."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

import htaf_export
from htaf_export import batch_axis

T, FEATURES, HIDDEN, CLASSES = 5, 12, 16, 4


class Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return (x >= 0).float()

    @staticmethod
    def backward(ctx, g):
        return g


class TimeFirstLif(nn.Module):
    def __init__(self, beta: float = 0.85) -> None:
        super().__init__()
        self.encode, self.readout, self.beta = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, CLASSES), beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros(x.shape[1], HIDDEN)
        w = torch.zeros(x.shape[1], CLASSES)
        spikes = []
        for t in range(x.shape[0]):
            v = self.beta * v + self.encode(x[t])
            s = Spike.apply(v - 0.5)
            v = v * (1 - s)
            w = self.beta * w + self.readout(s)
            out = Spike.apply(w - 0.5)
            w = w * (1 - out)
            spikes.append(out)
        return torch.stack(spikes)


class IteratedRate(nn.Module):
    """The same neuron written ``for x_t in x`` (each step a slice of the time axis), returning a dict: the rate
    (``torch.stack(spikes).mean(0)``), the count (``.sum(0)``) and the stacked spikes, time first."""

    def __init__(self) -> None:
        super().__init__()
        self.encode, self.readout = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        v, spikes = torch.zeros(x.shape[1], HIDDEN), []
        for x_t in x:
            v = 0.8 * v + self.encode(x_t)
            s = Spike.apply(v - 0.5)
            v = v * (1 - s)
            spikes.append(self.readout(s))
        return {"rate": torch.stack(spikes).mean(0), "count": torch.stack(spikes).sum(0), "seq": torch.stack(spikes)}


class PerPosition(nn.Module):
    """Batch first, [N, L, F], a step at each position: independent along axis 1 as well."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.fc(x) >= 0, 1.0, -1.0)


def _model() -> TimeFirstLif:
    torch.manual_seed(3)
    return TimeFirstLif().eval()


def _pt2(tmp_path, model: nn.Module):
    program = torch.export.export(model, (torch.rand(T, 3, FEATURES),),
                                  dynamic_shapes=({1: torch.export.Dim("batch")},))
    path = tmp_path / "lif.pt2"
    torch.export.save(program, path)
    return path


def _said_batch_first(result) -> None:
    assert any("batch first" in n and "np.moveaxis(x, 1, 0)" in n for n in result.conversion.notes), \
        result.conversion.notes


def test_inspect_says_an_export_is_batch_first(tmp_path, capsys):
    from htaf_export import cli

    assert cli.main(["inspect", str(_pt2(tmp_path, _model()))]) == 0
    assert "an export is batch first" in capsys.readouterr().out


def test_a_time_first_pt2_exports_batch_first_to_bit_packed_tflite(tmp_path):
    result = htaf_export.export(_pt2(tmp_path, _model()), "tflite", tmp_path / "lif.tflite", device="cpu")
    assert result.report.passed, result.report.first_failure
    _said_batch_first(result)
    assert result.hardening.sites and sum(t.elements for b in result.report.backends for t in b.tensors
                                          if t.kind == "binary") > 0
    from tensorflow import lite

    interpreter = lite.Interpreter(model_path=str(tmp_path / "lif.tflite"))
    assert list(interpreter.get_input_details()[0]["shape"][1:]) == [T, FEATURES]


def test_a_pickled_time_first_model_is_found_time_first_and_exports_to_onnx(tmp_path):
    """Validated in two worker processes too: each rebuilds the model batch-first."""
    path = tmp_path / "lif.pt"
    torch.save(_model(), path)
    result = htaf_export.export(path, "onnx", tmp_path / "lif.onnx", input_shape=[T, FEATURES], trust_pickle=True,
                                device="cpu", workers=2)
    assert result.report.passed, result.report.first_failure
    _said_batch_first(result)
    dims = onnx.load(tmp_path / "lif.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [T, FEATURES]
    # the artifact's sample i is the model's column i
    import onnxruntime as ort

    x = np.random.default_rng(0).random((T, 6, FEATURES), dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "lif.onnx")).run(None, {"input": np.moveaxis(x, 1, 0).copy()})[0]
    with torch.no_grad():
        want = _model()(torch.from_numpy(x)).numpy()
    assert np.array_equal(np.moveaxis(got, 0, 1), want)


def test_a_model_resolved_twice_keeps_its_batch_axes(tmp_path):
    """The module is made batch-first once (and marked): a second resolve must not probe the moved module."""
    path = tmp_path / "lif.pt"
    torch.save(_model(), path)
    loaded = htaf_export.load(path, trust_pickle=True)
    first = htaf_export.io.resolve(loaded, [T, FEATURES])
    again = htaf_export.io.resolve(loaded, [T, FEATURES])
    assert first.batch_axes == again.batch_axes == batch_axis.BatchAxes((1,), (1,))


def test_the_probe_leaves_batch_first_models_alone():
    torch.manual_seed(0)
    assert batch_axis.probe_axes(PerPosition().eval(), [[7, FEATURES]]) is None
    assert batch_axis.probe_axes(_model(), [[T, FEATURES]]) == batch_axis.BatchAxes((1,), (1,))


def test_a_loop_over_time_and_a_stacked_rate_convert_to_tflite(tmp_path):
    """Slices of the time axis read as ``x[:, t]``; ``stack(spikes).mean(0)`` and the stacked spikes stacked
    behind the batch: no transpose is left to move it."""
    torch.manual_seed(4)
    result = htaf_export.export(_pt2(tmp_path, IteratedRate().eval()), "tflite-float", tmp_path / "it.tflite",
                                device="cpu")
    assert result.report.passed, result.report.first_failure
    assert any("output 'seq' has the batch first" in n for n in result.conversion.notes), result.conversion.notes
    assert not any("rounding bounds are not available" in n for n in result.report.notes), result.report.notes


def _nir_runner(path):
    from htaf_export.runtimes import backends_for, read_artifact

    runners, _ = backends_for(read_artifact(path), "cpu")
    return {r.name: r for r in runners}


def test_a_time_first_model_exports_to_nir_and_its_file_reads_batch_first(tmp_path):
    """``x[t]`` of the moved input is ``x[:, t]`` of the file's: a NIR Input fed one step at a time; the
    stacked spikes are every step's output, stacked on axis 1."""
    import json

    result = htaf_export.export(_pt2(tmp_path, _model()), "nir", tmp_path / "lif.nir", device="cpu")
    assert result.report.passed, result.report.first_failure
    _said_batch_first(result)
    assert {b.backend for b in result.report.backends} == {"nir-sim", "snntorch"}
    info = htaf_export.runtimes.read_artifact(tmp_path / "lif.nir")
    assert json.loads(info.metadata["htaf_export.nir.time_inputs"]) == {"input": 0}
    assert json.loads(info.metadata["htaf_export.nir.readout"])["logits"]["combine"] == "stack"
    x = np.random.default_rng(1).random((T, 6, FEATURES), dtype=np.float32) * 2
    with torch.no_grad():
        want = _model()(torch.from_numpy(x)).numpy()
    assert want.any() and not want.all()
    for name, runner in _nir_runner(tmp_path / "lif.nir").items():
        got = runner.run({"input": np.moveaxis(x, 1, 0).copy()})["logits"]
        assert np.array_equal(np.moveaxis(got, 0, 1), want), name


def test_a_pickled_loop_over_time_exports_to_nir_with_every_readout(tmp_path):
    """``for x_t in x`` (slices of the time axis) on a pickle found time first; the rate, the count and the
    stacked outputs each combine the steps as the model does."""
    import json

    torch.manual_seed(4)
    path = tmp_path / "it.pt"
    torch.save(IteratedRate().eval(), path)
    result = htaf_export.export(path, "nir", tmp_path / "it.nir", input_shape=[T, FEATURES], trust_pickle=True,
                                device="cpu")
    assert result.report.passed, result.report.first_failure
    readout = json.loads(htaf_export.runtimes.read_artifact(tmp_path / "it.nir").metadata["htaf_export.nir.readout"])
    assert {k: (v["combine"], v.get("divide_by"), v.get("axis")) for k, v in readout.items()} == \
        {"rate": ("sum", float(T), None), "count": ("sum", None, None), "seq": ("stack", None, 1)}
    assert all(t.max_abs_error == 0 for b in result.report.backends for t in b.tensors if t.kind == "binary")


class ContextAndSequence(nn.Module):
    """A batch-first context ``c`` [N, 3] beside a time-first sequence ``x`` [T, N, F]."""

    def __init__(self) -> None:
        super().__init__()
        self.context, self.encode, self.readout = nn.Linear(3, HIDDEN), nn.Linear(FEATURES, HIDDEN), \
            nn.Linear(HIDDEN, CLASSES)

    def forward(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        v, bias, total = torch.zeros(x.shape[1], HIDDEN), self.context(c), 0
        for t in range(x.shape[0]):
            v = 0.8 * v + self.encode(x[t]) + bias
            s = Spike.apply(v - 0.5)
            v = v * (1 - s)
            total = total + self.readout(s)
        return total


def test_a_pickle_with_a_batch_first_input_beside_a_time_first_one_moves_only_that_one(tmp_path):
    """Was "the model does not run on inputs of shape [batch, 3]; [batch, 5, 12]": the probe moved every input
    or none."""
    torch.manual_seed(5)
    model = ContextAndSequence().eval()
    path = tmp_path / "ctx.pt"
    torch.save(model, path)
    result = htaf_export.export(path, "onnx", tmp_path / "ctx.onnx", input_shape=[[3], [T, FEATURES]],
                                trust_pickle=True, device="cpu")
    assert result.report.passed, result.report.first_failure
    note = next(n for n in result.conversion.notes if "batch first" in n)
    assert "input 'x' is [N, 5, 12]" in note and "'c'" not in note, note
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    c, x = rng.random((6, 3), dtype=np.float32), rng.random((T, 6, FEATURES), dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "ctx.onnx")).run(None, {"c": c, "x": np.moveaxis(x, 1, 0).copy()})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(c), torch.from_numpy(x)).numpy()
    assert np.array_equal(got, want)
