"""Fold weight expressions into constants: weights binarized inline become the ±1 (or ±scale) tensors they are.

A user's binary layer computes its weight in ``forward`` from a latent parameter: the straight-through
``w + (sign(w) − w).detach()``, ``where(w ≥ 0, 1, −1)``, ``sign(w) · mean|w|`` per output channel (XNOR-Net,
Bi-Real-Net)… In the captured graph that is a subgraph of constants feeding the weight input of a
Conv / Gemm / MatMul. Evaluated once here (whatever its size), it becomes one initializer named after the
parameter it came from, so later passes see binary weights where they are binary. The folded values are
what the model computes: ``w + (sign(w) − w)`` is exactly sign(w) in float32 for |w| ≤ 2^24, and
sign(0) = 0 stays 0 (a third value: such a layer is not binary, and the summary says so).

With a scale, the straight-through form ``w + (α·sign(w) − w)`` rounds: each weight lands within an ulp or
two of ±α rather than on it. Such a folded weight, every magnitude of a channel within ``SNAP_ULPS`` ulps
of that channel's most common magnitude, is snapped to exactly ±that magnitude, so the layer is binary; the
record gives the largest relative change (about 1e-7), which the parity rules absorb as rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import fold_constants

from .base import PassReport, report
from .pack_weights import channel_axis
from .util import WEIGHT_INPUTS, const_array

SNAP_ULPS = 4


def snapped(array: np.ndarray, axis: int) -> tuple[np.ndarray, float] | None:
    """``array`` with each channel's magnitudes set to the channel's most common one, and the largest relative
    change; None when some magnitude is further than ``SNAP_ULPS`` ulps from it, or when nothing changes."""
    if array.dtype != np.float32 or array.ndim == 0 or not np.all(np.isfinite(array)):
        return None
    moved = np.moveaxis(array, axis, 0)
    flat = np.abs(moved.reshape(moved.shape[0], -1))
    scale = np.empty(len(flat), np.float32)
    for c, row in enumerate(flat):
        values, counts = np.unique(row, return_counts=True)
        scale[c] = values[np.argmax(counts)]
    if not np.all(scale > 0):
        return None
    ulps = np.abs(flat.view(np.int32).astype(np.int64) - scale.view(np.int32).astype(np.int64)[:, None])
    if ulps.max() == 0 or ulps.max() > SNAP_ULPS:
        return None
    shape = [1] * array.ndim
    shape[axis] = -1
    exact = (np.where(array >= 0, 1.0, -1.0) * scale.reshape(shape)).astype(np.float32)
    change = float(np.max(np.abs(exact.astype(np.float64) - array) / np.abs(exact)))
    return exact, change


@dataclass(frozen=True)
class FoldedWeight:
    """A weight computed in ``forward`` and folded here: its name, the parameter it came from, and how much
    snapping to exact ±scale changed it (0 when it was not snapped)."""

    weight: str
    source: str | None
    snapped_change: float = 0.0


def _source_parameter(value: ir.Value) -> tuple[set[int], str | None]:
    """The nodes computing ``value`` from constants only (by id), and the largest initializer they read;
    (empty, None) when any input is computed at run time."""
    nodes: set[int] = set()
    best: tuple[int, str | None] = (-1, None)
    stack = [value]
    while stack:
        v = stack.pop()
        producer = v.producer()
        if producer is None:
            if v.const_value is None:
                return set(), None
            size = int(v.const_value.size) if hasattr(v.const_value, "size") else 0
            if v.name and size > best[0]:
                best = (size, v.name)
            continue
        if id(producer) in nodes:
            continue
        if producer.domain not in ("", "ai.onnx"):
            return set(), None
        nodes.add(id(producer))
        stack += [i for i in producer.inputs if i is not None]
    return nodes, best[1]


class FoldWeightExpressions(ir.passes.InPlacePass):
    """Evaluate constant subgraphs feeding layer weights; records (weight name, parameter it came from)."""

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        targets: dict[int, tuple[ir.Node, str | None]] = {}
        foldable: set[int] = set()
        for node in graph:
            index = WEIGHT_INPUTS.get(node.op_type) if node.domain == "" else None
            if index is None or len(node.inputs) <= index or node.inputs[index] is None:
                continue
            weight = node.inputs[index]
            if weight.producer() is None:
                continue
            nodes, source = _source_parameter(weight)
            if nodes:
                foldable |= nodes
                targets[id(node)] = (node, source)
        if not targets:
            return report(model)
        fold_constants(model, should_fold=lambda n: True if id(n) in foldable else None)
        records = []
        first: dict[str, ir.Value] = {}  # by parameter: a weight binarized anew at each time step folds to one
        for node, source in targets.values():
            index = WEIGHT_INPUTS[node.op_type]
            weight = node.inputs[index]
            if weight is None or const_array(weight) is None:
                continue
            seen = first.get(source) if source else None
            if seen is not None and seen is not weight and np.array_equal(const_array(seen), const_array(weight)):
                node.replace_input_with(index, seen)
                continue
            stale = graph.initializers.get(source) if source else None
            if stale is not None and stale is not weight and not stale.uses():
                graph.initializers.pop(source)  # the latent parameter, used by nothing now
            if source and weight.name in graph.initializers and weight.name != source:
                # still read elsewhere (XNOR-Net's mean |w| after the conv): the folded weight is the parameter's too
                name = source if source not in graph.initializers else f"{source}.folded"
                if name not in graph.initializers:
                    graph.initializers.pop(weight.name)
                    weight.name = name
                    graph.register_initializer(weight)
            array = const_array(weight)
            snap = snapped(array, channel_axis(node, array.ndim)) if array is not None else None
            if snap is not None:
                weight.const_value = ir.tensor(snap[0], name=weight.name)
            records.append(FoldedWeight(str(weight.name), source, snap[1] if snap else 0.0))
            if source:
                first.setdefault(source, weight)
        return report(model, records)
