"""``nir`` target: spiking and Heaviside networks as NIR graphs (HDF5), for neuromorphic simulators and chips.

    IR ─copy─▶ fold batch norms into step thresholds ─▶ neurons of each time step (nir_neurons) ─▶ NIR nodes of
       each time step (nir_graph), which must all be the same network ─▶ NIRGraph + htaf metadata ─▶ .nir bytes

A site called once per forward pass (a deep Heaviside network) becomes a ``Threshold``; a site called T > 1 times
with a leaky, zero-reset state becomes a ``LIF`` whose parameters make forward Euler at ``DT`` compute the model's
own update (docs/nir.md). An output summed or averaged over the T steps is the graph's ``Output`` at each step;
how to combine the steps is in the metadata (``htaf_export.nir.readout``), as is T.
"""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from typing import Mapping

import numpy as np
import onnx_ir as ir

from htaf_export import metadata as md
from htaf_export.capture import Capture
from htaf_export.contracts import Conversion, LayerRow, StepSpec
from htaf_export.errors import BadInput, UnsupportedLayer
from htaf_export.passes.bn_fold import FoldBatchNormIntoSteps
from htaf_export.passes.util import const_array
from htaf_export.targets import ExportOptions

from .layer_ops import fold_shape_arithmetic
from .nir_graph import DT, SliceGraph, inferred_shapes, node_name
from .nir_neurons import NotALif, lif_at, threshold_at

MODE = "nir"


def nir_module():
    try:
        import nir
    except ImportError:
        raise BadInput("the nir target needs nir: pip install 'htaf-export[nir]'") from None
    return nir


def convert(capture: Capture, provenance: Mapping[str, str], options: ExportOptions) -> Conversion:
    """The target's contract: IR + provenance + options → the .nir bytes and the export summary."""
    nir = nir_module()
    if options.portable:
        raise UnsupportedLayer("model", "--portable is for the onnx target")
    if not capture.steps:
        raise UnsupportedLayer("model", "it has no step (spike or Heaviside) to make a neuron of")
    model = capture.ir_copy()
    fold_shape_arithmetic(model)
    FoldBatchNormIntoSteps()(model)
    slices, time_steps, readout = time_slices(model, capture)
    first = slices[0]
    metadata = {**md.encode(provenance), md.TIE: _tie(capture.steps), md.ONNX_MODE: MODE,
                md.STEPS: json.dumps([s.to_dict() for s in capture.steps], sort_keys=True),
                md.NIR_DT: json.dumps(DT), md.NIR_TIME_STEPS: json.dumps(time_steps),
                md.NIR_READOUT: json.dumps(readout, sort_keys=True),
                md.NIR_SPIKES: json.dumps(_spike_tensors(first, capture.steps, time_steps), sort_keys=True)}
    graph = nir.NIRGraph(nodes=first.nodes, edges=sorted(first.edges), metadata=metadata)
    buffer = io.BytesIO()
    nir.write(buffer, graph)
    rows = [LayerRow(site, became, note) for site, became, note in first.rows]
    notes = (f"{time_steps} time steps at dt = {DT:g} s; outputs {_readout_text(readout)}",) if time_steps > 1 else ()
    return Conversion(buffer.getvalue(), tuple(rows), notes=notes)


def time_slices(model: ir.Model, capture: Capture) -> tuple[list[SliceGraph], int, dict[str, dict]]:
    """The NIR graph of every recognised time step (all equal), T, and how each output combines the steps.

    A site called T > 1 times is first read as a LIF layer unrolled over T steps; when that fails, as T separate
    Heaviside layers (a step function a deep network calls once per layer). When both fail, the refusal reported
    is the spiking one if a LIF layer was found (it names what the model would have to change)."""
    graph = model.graph
    for spec in capture.steps:
        if spec.op != "Heaviside":
            raise UnsupportedLayer(spec.site, "it is a ±1 sign; NIR neurons fire 0 or 1")
    counts = Counter(s.site for s in capture.steps)
    shapes = inferred_shapes(model)
    if max(counts.values()) == 1:
        return _feed_forward(graph, capture, shapes), 1, _readouts(graph, capture, 1)[1]
    try:
        return _spiking(graph, capture, counts, shapes)
    except NotALif:
        pass
    except UnsupportedLayer as spiking_refusal:
        try:
            return _feed_forward(graph, capture, shapes), 1, _readouts(graph, capture, 1)[1]
        except UnsupportedLayer:
            raise spiking_refusal from None
    return _feed_forward(graph, capture, shapes), 1, _readouts(graph, capture, 1)[1]


def _feed_forward(graph: ir.Graph, capture: Capture, shapes: dict) -> list[SliceGraph]:
    producers = {n.outputs[0].name: n for n in graph if n.outputs}
    neurons = {s.tensor: threshold_at(producers[s.tensor], s) for s in capture.steps}
    built = SliceGraph(graph, 0, neurons, {}, shapes)
    built.build(_readouts(graph, capture, 1)[0][0])
    return [built]


def _spiking(graph: ir.Graph, capture: Capture, counts: Counter, shapes: dict) -> tuple[list[SliceGraph], int, dict[str, dict]]:
    if len(set(counts.values())) != 1:
        raise UnsupportedLayer("model", "its step sites run different numbers of times per forward pass")
    time_steps = next(iter(counts.values()))
    producers = {n.outputs[0].name: n for n in graph if n.outputs}
    by_site: dict[str, list[StepSpec]] = defaultdict(list)
    for spec in sorted(capture.steps, key=lambda s: s.call):
        by_site[spec.site].append(spec)
    slices = []
    for k in range(1, time_steps):
        neurons = {specs[k].tensor: lif_at(producers[specs[k].tensor], producers[specs[k - 1].tensor], specs[k])
                   for specs in by_site.values()}
        slices.append(SliceGraph(graph, k, neurons, {s.tensor: s.site for s in capture.steps if s.call != k}, shapes))
    per_call, readout = _readouts(graph, capture, time_steps)
    for k, built in enumerate(slices, start=1):
        built.build(per_call[k])
    if len({s.digest() for s in slices}) > 1:
        raise UnsupportedLayer("model", "its time steps do not all compute the same network")
    return slices, time_steps, readout


def _readouts(graph: ir.Graph, capture: Capture, time_steps: int) -> tuple[dict[int, dict[str, ir.Value]], dict]:
    """{call: {output: its term at that step}} and {output: how the steps combine, and its Output node}."""
    per_call: dict[int, dict[str, ir.Value]] = defaultdict(dict)
    readout = {}
    for value in graph.outputs:
        terms, how = _readout(value, capture.steps, time_steps)
        for k, term in terms.items():
            per_call[k][value.name] = term
        readout[value.name] = {**how, "node": node_name(value.name)}
    return per_call, readout


def _readout(value: ir.Value, steps: tuple[StepSpec, ...], time_steps: int) -> tuple[dict[int, ir.Value], dict]:
    """The output's term of each time step, and how they combine: {"combine": "sum"} or with "divide_by"."""
    if time_steps == 1:
        return {0: value}, {"combine": "single"}
    output = value.name or "output"
    how: dict = {"combine": "sum"}
    node = value.producer()
    if node is not None and node.op_type == "Div" and const_array(node.inputs[1]) is not None \
            and const_array(node.inputs[1]).size == 1:
        how["divide_by"] = float(const_array(node.inputs[1]).reshape(()))
        value = node.inputs[0]
    terms = _sum_terms(value)
    calls = {s.tensor: s.call for s in steps}
    by_call: dict[int, ir.Value] = {}
    for term in terms:
        found = _calls_feeding(term, calls)
        if len(found) != 1 or next(iter(found)) in by_call:
            raise UnsupportedLayer(output, "it is not a sum or mean over time steps of one layer's "
                                   "output at each step (a leaky readout or a delay is not exported yet)")
        by_call[found.pop()] = term
    if sorted(by_call) != list(range(time_steps)):
        raise UnsupportedLayer(output, "it does not read every time step")
    return by_call, how


def _sum_terms(value: ir.Value) -> list[ir.Value]:
    node = value.producer()
    if node is not None and node.op_type == "Add" and node.domain == "":
        terms = []
        for v in node.inputs:
            if not _is_zero(v):
                terms += _sum_terms(v)  # type: ignore[arg-type]
        return terms
    return [value]


def _is_zero(value: ir.Value | None) -> bool:
    array = const_array(value)
    node = value.producer() if value is not None else None
    if array is None and node is not None and node.op_type == "Expand":
        array = const_array(node.inputs[0])
    return array is not None and bool(np.all(array == 0))


def _calls_feeding(value: ir.Value, calls: dict[str, int]) -> set[int]:
    """The time steps whose spikes reach ``value``."""
    seen, found, stack = set(), set(), [value]
    while stack:
        v = stack.pop()
        if id(v) in seen or v is None:
            continue
        seen.add(id(v))
        if v.name in calls:
            found.add(calls[v.name])
            continue
        node = v.producer()
        if node is not None:
            stack.extend(node.inputs)
    return found


def _spike_tensors(first: SliceGraph, steps: tuple[StepSpec, ...], time_steps: int) -> dict[str, list[str | None]]:
    """{neuron node: the step tensor of its spikes at each time step} (None where capture merged a step away)."""
    if time_steps == 1:
        return {first.neuron_node(tensor): [tensor] for tensor in first.neurons}
    tensors = {(s.site, s.call): s.tensor for s in steps}
    return {first.neuron_node(tensor): [tensors.get((n.site, k)) for k in range(time_steps)]
            for tensor, n in first.neurons.items()}


def _tie(steps: tuple[StepSpec, ...]) -> str:
    ties = {s.tie for s in steps}
    return ties.pop() if len(ties) == 1 else "mixed"


def _readout_text(readout: dict[str, dict]) -> str:
    parts = []
    for name, how in sorted(readout.items()):
        parts.append(f"{name} = mean over steps" if "divide_by" in how else f"{name} = sum over steps")
    return ", ".join(parts)
