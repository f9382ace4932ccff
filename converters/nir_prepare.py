"""An unrolled spiking IR made ready for neuron recognition (``nir_neurons``), for the way snnTorch writes its
neurons: ``snn.Leaky`` computes its reset from the previous membrane, a second step each time step
(s[k−1] again, H(X[k−1] − θ)), and starts from ``zeros_like`` of its input, whose first reset step reads
constants only. So:

- steps of equal inputs are one step (common subexpressions eliminated: the reset is the previous spike);
- a step of constants (the zero state's reset) is its constant, and what only constants feed folds with it;
- a product by exactly 1 (the spikes times snnTorch's threshold of 1) is its other factor;
- the steps left are renumbered per site in graph order: call k is time step k again.

The tensor names stay: the file's spikes are read back as the steps the model computed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from htaf_export.capture import Capture
from htaf_export.ops import HTAF_DOMAIN
from htaf_export.passes.util import new_initializer

from .nir_neurons import filled

FOLDED = {"Sub": np.subtract, "Add": np.add, "Mul": np.multiply, "Div": np.divide}


def _constant(value: ir.Value | None) -> np.ndarray | None:
    array = filled(value)
    return None if array is None or array.size != 1 else np.asarray(array, np.float32).reshape(())


def _fold(graph: ir.Graph) -> set[str]:
    """Replace every step of constants, and every elementwise op of scalar constants (a zero state's Expand
    included), by its scalar constant; → the step tensors folded away."""
    folded: set[str] = set()
    for node in list(graph):
        if node.op_type not in FOLDED and not (node.domain == HTAF_DOMAIN and node.op_type == "Heaviside"):
            continue
        args = [_constant(v) for v in node.inputs]
        if any(a is None for a in args):
            continue
        if node.op_type == "Heaviside":
            tie = node.attributes["tie"].as_string()
            result = np.float32(args[0] > args[1] if tie == "gt" else args[0] >= args[1])
            folded.add(str(node.outputs[0].name))
        else:
            result = np.float32(FOLDED[node.op_type](args[0], args[1]))
        name = str(node.outputs[0].name)
        value = new_initializer(graph, f"{name}.folded", np.asarray(result, np.float32))
        ir.convenience.replace_all_uses_with(node.outputs[0], value)
    return folded


def _drop_unit_products(graph: ir.Graph) -> None:
    """x · 1 is x exactly: snnTorch's spikes times its threshold of 1 need no NIR Scale node."""
    for node in list(graph):
        if node.op_type != "Mul" or node.domain != "" or len(node.inputs) != 2:
            continue
        for other, factor in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            array = filled(factor) if factor is not None and factor.const_value is not None else None
            if array is not None and array.size and np.all(array == 1) and other is not None and \
                    other.shape is not None and node.outputs[0].shape is not None and \
                    list(other.shape) == list(node.outputs[0].shape) and not node.outputs[0].is_graph_output():
                ir.convenience.replace_all_uses_with(node.outputs[0], other)
                break


def prepared(model: ir.Model, capture: Capture) -> Capture:
    """``model`` (a copy) made ready in place; → ``capture`` with the steps it still computes, renumbered."""
    common_passes.CommonSubexpressionEliminationPass()(model)
    folded = _fold(model.graph)
    _drop_unit_products(model.graph)
    common_passes.RemoveUnusedNodesPass()(model)
    produced = {str(o.name) for n in model.graph for o in n.outputs}
    kept = [s for s in capture.steps if s.tensor in produced and s.tensor not in folded]
    if len(kept) == len(capture.steps):
        return capture
    order = {str(n.outputs[0].name): i for i, n in enumerate(model.graph) if n.outputs}
    renumbered, seen = [], {}
    for spec in sorted(kept, key=lambda s: order[s.tensor]):
        renumbered.append(replace(spec, call=seen.get(spec.site, 0)))
        seen[spec.site] = seen.get(spec.site, 0) + 1
    return replace(capture, steps=tuple(renumbered))
