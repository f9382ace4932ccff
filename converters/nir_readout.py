"""How each graph output combines the time steps of an unrolled spiking network.

The model's output is a sum over the T steps (often divided by T) of one term per step: a layer's output at that
step (``total += fc(s)``), or a leaky readout's state (``vo = λ·vo + fc(s); total += vo``), which is a NIR ``LI``
neuron. Each term must read the spikes of exactly its own step.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from htaf_export.capture import Capture
from htaf_export.contracts import StepSpec
from htaf_export.errors import UnsupportedLayer
from htaf_export.passes.util import attr, const_array

from .nir_graph import node_name
from .nir_neurons import is_constant


def readouts(graph: ir.Graph, capture: Capture, time_steps: int) -> tuple[dict[int, dict[str, ir.Value]], dict]:
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
    stacked = _stacked(value, time_steps)
    if stacked is not None:
        terms, combined = stacked
        how.update(combined)
    else:
        terms = _spine(value, time_steps) or _sum_terms(value)
    calls = {s.tensor: s.call for s in steps}
    by_call: dict[int, ir.Value] = {}
    leaky = _leaky_chain(terms, calls, time_steps)
    if leaky is not None:
        by_call, how["leak"] = leaky
        terms = []
    for term in terms:
        found = _calls_feeding(term, calls)
        if how["combine"] == "stack" and len(found) > 1:
            raise UnsupportedLayer(output, "each step's value reads earlier time steps' spikes (a membrane "
                                   "record, or another state carried between steps): a NIR graph outputs what its "
                                   "neurons and the layers after them compute at each step; return the spikes, or "
                                   "export the model without that output")
        if len(found) != 1 or next(iter(found)) in by_call:
            raise UnsupportedLayer(output, "it is not a sum or mean over time steps of one layer's output or "
                                   "of a leaky readout (a delay, or a readout that resets, is not exported)")
        by_call[found.pop()] = term
    if sorted(by_call) != list(range(time_steps)):
        raise UnsupportedLayer(output, "it does not read every time step")
    return by_call, how


def _stacked(value: ir.Value, time_steps: int) -> tuple[list[ir.Value], dict] | None:
    """(the T stacked terms, how they combine) for ``torch.stack(terms, a)`` — returned per step, "stack" on
    that axis — or for its sum or mean over the stacked axis; None for any other value."""
    node = value.producer()
    reduced = node is not None and node.op_type in ("ReduceSum", "ReduceMean") and node.domain == "" \
        and attr(node, "keepdims", 1) == 0 and len(node.inputs) > 1
    concat = node.inputs[0].producer() if reduced and node.inputs[0] is not None else node  # type: ignore[union-attr]
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != time_steps:
        return None
    axis = int(attr(concat, "axis", 0))
    terms = []
    for part in concat.inputs:
        lifted = part.producer() if part is not None else None
        axes = const_array(lifted.inputs[1]) if lifted is not None and lifted.op_type == "Unsqueeze" else None
        if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) != axis:
            return None
        terms.append(lifted.inputs[0])  # type: ignore[union-attr]
    if not reduced:
        return terms, {"combine": "stack", "axis": axis}
    over = const_array(node.inputs[1])  # type: ignore[union-attr]
    if over is None or over.size != 1 or int(over.reshape(-1)[0]) != axis:
        return None
    return terms, {"divide_by": float(time_steps)} if node.op_type == "ReduceMean" else {}  # type: ignore[union-attr]


def _leaky_chain(terms: list[ir.Value], calls: dict[str, int], time_steps: int
                 ) -> tuple[dict[int, ir.Value], float | list[float]] | None:
    """({step: the input current O[k]}, λ) when the terms are a leaky readout's states, in step order:
    vo[0] = O[0] (or λ·0 + O[0]),  vo[k] = λ·vo[k−1] + O[k]; None when they are not. λ is one number, or one
    per output unit (a list, as the file's readout metadata holds it)."""
    if len(terms) != time_steps or time_steps < 2:
        return None
    currents: dict[int, ir.Value] = {}
    leak: np.ndarray | None = None
    for k, term in enumerate(terms):
        node = term.producer()
        if k == 0:
            parts = [v for v in node.inputs if not _is_zero(v) and not _scaled_zero(v)] \
                if node is not None and node.op_type == "Add" else [term]
            if len(parts) != 1:
                return None
            currents[0] = parts[0]
            continue
        if node is None or node.op_type != "Add":
            return None
        for state, current in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            factor = _leak_of(state, terms[k - 1])
            if factor is not None and (leak is None or np.array_equal(factor, leak)):
                leak, currents[k] = factor, current
                break
        else:
            return None
    if any(_calls_feeding(currents[k], calls) != {k} for k in currents):
        return None
    if leak.size == 1:  # type: ignore[union-attr]
        return currents, float(leak.reshape(()))  # type: ignore[union-attr]
    return currents, [float(v) for v in leak.reshape(-1)]  # type: ignore[union-attr]


def _leak_of(state: ir.Value, previous: ir.Value) -> np.ndarray | None:
    """The constant λ of λ·previous: one number, or one per unit of the last axis (a tensor ``beta``)."""
    if state is previous:
        return np.ones((), np.float32)
    node = state.producer()
    if node is None or node.op_type != "Mul" or previous not in node.inputs:
        return None
    other = node.inputs[1] if node.inputs[0] is previous else node.inputs[0]
    factor = const_array(other)
    if factor is None or (factor.size > 1 and factor.reshape(-1).size != factor.shape[-1]):
        return None
    return np.asarray(factor, np.float32).reshape(() if factor.size == 1 else (-1,))


def _scaled_zero(value: ir.Value) -> bool:
    node = value.producer()
    return node is not None and node.op_type == "Mul" and any(_is_zero(v) for v in node.inputs)


def _spine(value: ir.Value, n: int) -> list[ir.Value] | None:
    """The n terms of ``value`` as a running sum ((t0 + t1) + t2) + …, the way a loop accumulates, or None."""
    node = value.producer()
    is_add = node is not None and node.op_type == "Add" and node.domain == ""
    if n == 1:
        if is_add and any(_is_zero(v) for v in node.inputs):  # type: ignore[union-attr]
            return [v for v in node.inputs if not _is_zero(v)][:1]  # type: ignore[union-attr, misc]
        return [value]
    if not is_add:
        return None
    for total, term in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):  # type: ignore[union-attr]
        if total is None or term is None or _is_zero(term):
            continue
        earlier = _spine(total, n - 1)
        if earlier is not None:
            return earlier + [term]
    return None


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
    return is_constant(value, 0.0)


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
