"""Reading a ``.nir`` file written by htaf-export, and the time loop its validation backends share.

A backend simulates one time step at a time (``step``); :class:`TimeLoop` feeds it the input as the model reads
it (the whole input at every step, or step t of an event stream at time step t), names each neuron's spikes after
the step tensor of the same site and call, and combines each output over the steps as the file's readout says (sum, then divide, in float32 and in time order,
as the model's own loop does; or every step's value stacked on a time axis).
"""

from __future__ import annotations

import abc
import io
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import metadata as md
from ..errors import BadInput
from . import ArtifactInfo, read_steps


def nir_module():
    try:
        import nir
    except ImportError:
        raise BadInput("reading a .nir file needs nir: pip install 'htaf-export[nir]'") from None
    return nir


def load_graph(data: bytes | Path):
    """The NIRGraph in a file (or its bytes); one clear error for anything nir cannot read."""
    nir = nir_module()
    if isinstance(data, Path) and not data.is_file():
        raise BadInput(f"{data} does not exist")
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return nir.read(source)
    except Exception as e:  # h5py and nir raise many types for a damaged file; all mean the same to a user
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise BadInput(f"{data if isinstance(data, Path) else 'the file'} is not a readable NIR file: {first}") from None


def graph_metadata(graph) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else str(v) for k, v in (graph.metadata or {}).items()}


def read_nir_artifact(path: Path) -> ArtifactInfo:
    graph = load_graph(path)
    meta = graph_metadata(graph)
    if md.STEPS not in meta or md.NIR_READOUT not in meta:
        raise BadInput(f"artifact {path} was not written by htaf-export (no htaf_export metadata)")
    steps = read_steps(path, meta)
    inputs = tuple(json.loads(meta[md.NIR_INPUTS]) if md.NIR_INPUTS in meta
                   else sorted(n for n, node in graph.nodes.items() if type(node).__name__ == "Input"))
    outputs = tuple(json.loads(meta[md.NIR_OUTPUTS]) if md.NIR_OUTPUTS in meta
                    else sorted(json.loads(meta[md.NIR_READOUT])))
    spikes = json.loads(meta[md.NIR_SPIKES])
    feeding = {dst: src for src, dst in graph.edges}
    layers = {tensor: feeding.get(node, node) for node, tensors in spikes.items() for tensor in tensors if tensor}
    return ArtifactInfo(path, "nir", inputs, outputs, tuple(steps), meta, layers)


class TimeLoop:
    """T steps of a per-step simulator, returning outputs and step tensors like every other runner."""

    def __init__(self, info: ArtifactInfo) -> None:
        meta = info.metadata
        self.info = info
        self.time_steps = int(json.loads(meta[md.NIR_TIME_STEPS]))
        self.readout: dict[str, dict[str, Any]] = json.loads(meta[md.NIR_READOUT])
        tensors: Mapping[str, list] = json.loads(meta[md.NIR_SPIKES])
        # (node, time step) → step tensor; a step merged away at capture has none and is not reported
        self.spike_names = {(node, k): tensor for node, names in tensors.items() for k, tensor in enumerate(names)
                            if tensor}
        # inputs read one step at a time (an event stream): {name: per-sample time axis}
        self.time_inputs: Mapping[str, int] = json.loads(meta.get(md.NIR_TIME_INPUTS, "{}"))
        self.inference_seconds = 0.0

    def run(self, inputs: dict[str, np.ndarray], reset, step) -> dict[str, np.ndarray]:
        """``reset()`` starts every neuron at zero; ``step(inputs) → ({output node: array}, {neuron: spikes})``."""
        feed = {name: np.ascontiguousarray(inputs[name], dtype=np.float32) for name in self.info.input_names}
        totals: dict[str, np.ndarray] = {}
        found: dict[str, np.ndarray] = {}
        stacked: dict[str, list[np.ndarray]] = {}  # outputs returned at every step, stacked on a time axis
        reset()
        for k in range(self.time_steps):
            now = {name: np.ascontiguousarray(np.take(x, k, axis=self.time_inputs[name] + 1))
                   if name in self.time_inputs else x for name, x in feed.items()}
            started = time.perf_counter()
            outputs, spikes = step(now)
            self.inference_seconds += time.perf_counter() - started
            for name, how in self.readout.items():
                value = np.asarray(outputs[how["node"]], dtype=np.float32)
                if how["combine"] == "stack":
                    stacked.setdefault(name, []).append(value)
                else:
                    totals[name] = value if k == 0 else (totals[name] + value).astype(np.float32)
            for node, value in spikes.items():
                if (node, k) in self.spike_names:
                    found[self.spike_names[(node, k)]] = np.asarray(value, dtype=np.float32)
        for name, values in stacked.items():
            totals[name] = np.stack(values, axis=self.readout[name]["axis"])
        for name, how in self.readout.items():
            if "divide_by" in how:
                totals[name] = (totals[name] / np.float32(how["divide_by"])).astype(np.float32)
        return {**totals, **found}


class NirRunner(abc.ABC):
    """What both NIR backends share: the file's graph, the time loop, and the runner interface. A backend sets
    ``name`` and defines ``_reset()`` and ``_step(feed)`` (see ``TimeLoop.run``)."""

    name = "nir"
    device = "cpu"

    def __init__(self, info: ArtifactInfo) -> None:
        self.info = info
        self.loop = TimeLoop(info)
        self.graph = load_graph(info.path)

    @property
    def inference_seconds(self) -> float:
        return self.loop.inference_seconds

    @abc.abstractmethod
    def _reset(self) -> None:
        """Start every neuron's state afresh (a new batch of samples)."""

    @abc.abstractmethod
    def _step(self, feed: dict[str, np.ndarray]):
        """One time step on ``feed``: ({output node: array}, {neuron node: spikes})."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.loop.run(inputs, self._reset, self._step)


def leak_text(leak: float | list[float] | np.ndarray) -> str:
    """A leak as the summaries show it: the number, or the range of one per neuron."""
    array = np.asarray(leak, np.float32)
    return f"{float(array.reshape(-1)[0]):g}" if array.size == 1 else \
        f"per neuron, {float(array.min()):g} to {float(array.max()):g}"
