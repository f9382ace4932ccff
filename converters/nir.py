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
from dataclasses import replace
from typing import Mapping

import onnx_ir as ir

from htaf_export import metadata as md
from htaf_export.capture import Capture
from htaf_export.contracts import Conversion, LayerRow, StepSpec
from htaf_export.errors import BadInput, UnsupportedLayer
from htaf_export.passes.bn_fold import FoldBatchNormIntoSteps
from htaf_export.targets import ExportOptions

from .batch_transposes import dissolve_batch_transposes
from .layer_ops import fold_shape_arithmetic
from .nir_graph import DT, SliceGraph, inferred_shapes, node_name
from .nir_prepare import prepared
from .nir_neurons import NotALif, InexpressibleLif, lif_at, lif_first, steps_by_weights, threshold_at
from .nir_readout import readouts

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
    dissolve_batch_transposes(model)  # a time-first model's loop reads x[:, t] of its batch-first input
    computed = prepared(model, capture)  # the steps it computes, renumbered by time step (tensors as captured)
    kept = {s.tensor for s in computed.steps}
    FoldBatchNormIntoSteps()(model)
    slices, time_steps, readout, read_as = time_slices(model, computed)
    first = slices[0]
    metadata = {**md.encode(provenance), md.TIE: _tie(capture.steps), md.ONNX_MODE: MODE,
                md.STEPS: json.dumps([s.to_dict() for s in capture.steps if s.tensor in kept], sort_keys=True),
                md.NIR_DT: json.dumps(DT), md.NIR_TIME_STEPS: json.dumps(time_steps),
                md.NIR_READOUT: json.dumps(readout, sort_keys=True),
                md.NIR_SPIKES: json.dumps(_spike_tensors(first, read_as, time_steps), sort_keys=True),
                md.NIR_TIME_INPUTS: json.dumps({k: v for k, v in first.time_axes.items() if v is not None},
                                               sort_keys=True),
                # in the model's order (NIR keeps nodes by name): how validation pairs them with the reference's
                md.NIR_INPUTS: json.dumps([node_name(n) for n in capture.input_names]),
                md.NIR_OUTPUTS: json.dumps(list(capture.output_names))}
    graph = nir.NIRGraph(nodes=first.nodes, edges=sorted(first.edges), metadata=metadata)
    buffer = io.BytesIO()
    nir.write(buffer, graph)
    rows = [LayerRow(site, became, note) for site, became, note in first.rows]
    notes = (f"{time_steps} time steps at dt = {DT:g} s; {_readout_text(readout)}",) if time_steps > 1 else ()
    return Conversion(buffer.getvalue(), tuple(rows), notes=notes)


def time_slices(model: ir.Model, capture: Capture
                ) -> tuple[list[SliceGraph], int, dict[str, dict], tuple[StepSpec, ...]]:
    """The NIR graph of every recognised time step (all equal), T, how each output combines the steps, and the
    steps with the (site, call) they were read with.

    A site called T > 1 times is first read as a LIF layer unrolled over T steps; when that fails, as T separate
    Heaviside layers (a step function a deep network calls once per layer). Steps are grouped into layers by
    site, else by the weights they read (``_groupings``). When both fail, the refusal reported is the spiking one
    if a LIF layer was found (it names what the model would have to change)."""
    graph = model.graph
    for spec in capture.steps:
        if spec.op != "Heaviside":
            raise UnsupportedLayer(spec.site, "it is a ±1 sign; NIR neurons fire 0 or 1 (an HTAF with levels='01')")
    shapes = inferred_shapes(model)
    spiking_refusal: UnsupportedLayer | None = None
    for grouping in _groupings(graph, capture.steps):
        try:
            spiking = replace(capture, steps=grouping)
            return (*_spiking(graph, spiking, Counter(s.site for s in grouping), shapes), grouping)
        except InexpressibleLif as e:  # a LIF this target cannot write: said if no other reading works
            spiking_refusal = spiking_refusal or e
        except NotALif:
            pass
        except UnsupportedLayer as e:
            spiking_refusal = spiking_refusal or e
    try:
        return _feed_forward(graph, capture, shapes), 1, readouts(graph, capture, 1)[1], capture.steps
    except UnsupportedLayer:
        if spiking_refusal is not None:
            raise spiking_refusal from None
        raise


def _groupings(graph: ir.Graph, steps: tuple[StepSpec, ...]) -> list[tuple[StepSpec, ...]]:
    """The ways to read the steps as LIF layers called more than once, in order: by site as captured (a module
    called per time step), then by the weights they read (a traced graph, or one module's hand-written loop with
    two layers: their comparisons share the module's site)."""
    found = [steps] if len({s.site for s in steps}) < len(steps) else []
    by_weights = steps_by_weights(graph, steps)
    if by_weights is not None and by_weights != steps:
        found.append(by_weights)
    return found


def _feed_forward(graph: ir.Graph, capture: Capture, shapes: dict) -> list[SliceGraph]:
    producers = {n.outputs[0].name: n for n in graph if n.outputs}
    neurons = {s.tensor: threshold_at(producers[s.tensor], s) for s in capture.steps}
    built = SliceGraph(graph, 0, neurons, {}, shapes)
    built.build(readouts(graph, capture, 1)[0][0])
    return [built]


def _spiking(graph: ir.Graph, capture: Capture, counts: Counter, shapes: dict) -> tuple[list[SliceGraph], int, dict[str, dict]]:
    if len(set(counts.values())) != 1:
        raise UnsupportedLayer("model", "its step sites run different numbers of times per forward pass")
    time_steps = next(iter(counts.values()))
    producers = {n.outputs[0].name: n for n in graph if n.outputs}
    by_site: dict[str, list[StepSpec]] = defaultdict(list)
    for spec in sorted(capture.steps, key=lambda s: s.call):
        by_site[spec.site].append(spec)
    later = [{specs[k].tensor: lif_at(producers[specs[k].tensor], producers[specs[k - 1].tensor], specs[k])
              for specs in by_site.values()} for k in range(1, time_steps)]
    leak_of = {n.site: n.leak for n in later[0].values()}
    first = {specs[0].tensor: lif_first(producers[specs[0].tensor], specs[0], leak_of[site])  # type: ignore[arg-type]
             for site, specs in by_site.items()}
    per_call, readout = readouts(graph, capture, time_steps)
    leaks = {name: how["leak"] for name, how in readout.items() if "leak" in how}
    slices = []
    for k, neurons in enumerate([first, *later]):
        slices.append(SliceGraph(graph, k, neurons, {s.tensor: s.site for s in capture.steps if s.call != k}, shapes,
                                 time_steps))
        slices[-1].build(per_call[k], leaks)
    if len({s.digest() for s in slices}) > 1:
        raise UnsupportedLayer("model", "its time steps do not all compute the same network")
    return slices[1:], time_steps, readout  # call 1 names the file's nodes (call 0 reads no earlier state)


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
        what = "a leaky readout's state" if "leak" in how else "its layer's output"
        combined = f"at every step, stacked on axis {how['axis']}" if how["combine"] == "stack" else \
            "averaged over the steps" if "divide_by" in how else "summed over the steps"
        parts.append(f"{name} is {what} {combined}")
    return ", ".join(parts)
