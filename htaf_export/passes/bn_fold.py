"""Fold a batch norm that feeds a step into the step's per-channel threshold, keeping the tie exact.

For one channel, with y = γ·(x − μ)/σ + b and σ = √(var + ε):

    γ > 0:   y ≥ θ  ⇔   x ≥ μ + (θ − b)·σ/γ = t
    γ < 0:   y ≥ θ  ⇔  −x ≥ −t                      (the comparison flips: multiply x by −1)
    γ = 0:   y = b, a constant: 0·x compared with a threshold chosen to give b's answer

so the step becomes step(s·x, s·t) with s = sign(γ) ∈ {−1, 0, +1}. Multiplying by ±1 is exact in
floating point and both sides keep ``≥`` (or ``>``), so the tie rule is preserved at the threshold.
The folded threshold is rounded once to float32; the reference rounds inside its own batch norm,
so the two can only disagree where the reference pre-activation is within rounding of θ.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..ops import HTAF_DOMAIN, STEP_OPS
from .util import const_array, new_initializer


def _fold_one(graph: ir.Graph, bn: ir.Node, step: ir.Node) -> bool:
    params = [const_array(v) for v in bn.inputs[1:5]]
    theta = const_array(step.inputs[1])
    x = bn.inputs[0]
    if any(p is None for p in params) or theta is None or theta.size != 1 or x is None or x.shape is None:
        return False
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
    eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
    sigma = np.sqrt(var.astype(np.float32) + np.float32(eps)).astype(np.float64)
    th = float(theta.reshape(()))
    s = np.sign(gamma)
    safe = np.where(gamma == 0, 1.0, gamma)
    t = mean + (th - beta) * sigma / safe
    # γ = 0: the output is b everywhere; 0·x = 0 then fires exactly when b's comparison with θ does.
    ge = step.attributes["tie"].as_string() == "ge"
    fires = beta >= th if ge else beta > th
    constant_t = np.where(fires, 0.0 if ge else -1.0, 1.0 if ge else 0.0)
    threshold = np.where(gamma == 0, constant_t, s * t)
    shape = (-1,) + (1,) * (len(x.shape) - 2)
    name = step.outputs[0].name or "step"
    t_value = new_initializer(graph, f"{name}.threshold", threshold.astype(np.float32).reshape(shape))
    new_nodes = []
    if np.all(s == 1):
        source = x
    else:
        s_value = new_initializer(graph, f"{name}.direction", s.astype(np.float32).reshape(shape))
        flip = ir.node("Mul", [x, s_value], name=f"{name}/direction")
        flip.outputs[0].name = f"{name}.directed_input"
        new_nodes.append(flip)
        source = flip.outputs[0]
    graph.insert_before(bn, new_nodes) if new_nodes else None
    step.replace_input_with(0, source)
    step.replace_input_with(1, t_value)
    graph.remove(bn, safe=True)
    return True


def fold_batchnorm_into_steps(model: ir.Model) -> tuple[ir.Model, bool]:
    """Fold every BatchNormalization whose only consumer is a step (and is no graph output)."""
    graph = model.graph
    changed = False
    for bn in [n for n in graph if n.op_type == "BatchNormalization" and n.domain == ""]:
        out = bn.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1 or len(bn.outputs) != 1 and any(o.uses() for o in bn.outputs[1:]):
            continue
        step, index = uses[0].node, uses[0].idx
        if step.domain != HTAF_DOMAIN or step.op_type not in STEP_OPS or index != 0:
            continue
        changed |= _fold_one(graph, bn, step)
    return model, changed
