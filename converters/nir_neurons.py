"""Recognise the neurons of an unrolled IR: which step is a LIF layer (its leak, threshold and reset), which a
plain Heaviside (a NIR ``Threshold``), and which tensor is each neuron's input current.

A LIF layer unrolled over T time steps reads, at every call k ≥ 1 of its step site,

    X[k] = λ·R[k−1] + I[k]          (or R[k−1] + I[k] when λ = 1)
    s[k] = step(X[k] − c, θ)        (c: an optional constant the model subtracts before its step)
    R[k] = X[k]·(1 − s[k])   or   where(s[k], 0, X[k])                      zero reset: NIR's v_reset = 0
           X[k] − θ·s[k]                                                    subtract reset: refused (docs/nir.md)

Call 0 must start from zero state (its membrane is I[0], or λ·0 + I[0]); every call must give the same neuron.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from htaf_export.contracts import StepSpec
from htaf_export.errors import UnsupportedLayer
from htaf_export.ops import HTAF_DOMAIN
from htaf_export.passes.util import attr, const_array
from htaf_export.runtimes.nir_file import leak_text

SUBTRACT_RESET = ("subtract reset (v ← v − θ·s) has no exact NIR form: a NIR LIF resets to v_reset, and rebuilding "
                  "the subtraction from NIR nodes rounds differently in float32; train with a zero reset (snnTorch: "
                  "reset_mechanism='zero') to export to NIR (docs/nir.md)")


class NotALif(UnsupportedLayer):
    """The site's calls are not a leaky membrane unrolled over time (maybe one step function used by several
    layers), as opposed to a LIF layer that NIR cannot express."""


class InexpressibleLif(NotALif):
    """A LIF layer in a form this target does not write (snnTorch's subtract reset, after the leak; a leak per
    neuron). Said only when no other reading of the steps works (a shared step function may look so)."""


@dataclass(frozen=True)
class Neuron:
    """One neuron layer at one time step: its step site, the tensor that feeds it (the input current of a LIF,
    the pre-activation of a Threshold), and its parameters as the model computes them."""

    site: str
    kind: str  # "lif" or "threshold"
    current: ir.Value
    threshold: np.ndarray  # float32; the model fires at X ≥ θ (tie ge) or X > θ (tie gt)
    tie: str
    leak: float | np.ndarray | None = None  # lif: v ← leak·v + I (one leak, or one per neuron)


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.domain == "" and node.op_type == op else None


def filled(value: ir.Value | None) -> np.ndarray | None:
    """The contents of a constant, or of an ``Expand`` / ``ConstantOfShape`` of one (``zeros_like``, ``full``), as
    far as they are known without the run-time shape; None for a computed tensor."""
    array = const_array(value)
    if array is None and _producer(value, "Expand") is not None:
        array = const_array(value.producer().inputs[0])  # type: ignore[union-attr]
    fill = _producer(value, "ConstantOfShape")
    if array is None and fill is not None:
        given = fill.attributes.get("value")
        array = given.as_tensor().numpy() if given is not None else np.zeros(1, np.float32)
    return array


def is_constant(value: ir.Value | None, number: float) -> bool:
    """A constant that is ``number`` everywhere (``filled``)."""
    array = filled(value)
    return array is not None and array.size > 0 and bool(np.all(array == number))


def _scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def _leak(value: ir.Value | None) -> float | np.ndarray | None:
    """A constant leak: one number, or one per neuron (snnTorch's tensor beta)."""
    array = const_array(value)
    if array is None or array.size == 0:
        return None
    return float(array.reshape(-1)[0]) if array.size == 1 else array.astype(np.float32)


def _reads_spike(value: ir.Value | None, spike: ir.Value) -> bool:
    """``value`` is the spike itself, or a comparison / cast of it that is true where it fired."""
    if value is spike:
        return True
    node = value.producer() if value is not None else None
    if node is None or node.domain != "":
        return False
    if node.op_type == "Cast":
        return node.inputs[0] is spike
    if node.op_type == "Greater":
        return node.inputs[0] is spike and is_constant(node.inputs[1], 0.0)
    if node.op_type == "Equal":
        return spike in node.inputs and any(is_constant(v, 1.0) for v in node.inputs)
    if node.op_type in ("GreaterOrEqual", "Greater"):  # the spike's own test again: where(v >= θ, 0, v)
        return _same_test(node, spike)
    return False


def _same_test(compare: ir.Node, spike: ir.Value) -> bool:
    """``compare`` tests the spike's membrane against its threshold with its tie rule: true exactly where it fired."""
    step = spike.producer()
    if step is None or step.domain != HTAF_DOMAIN or step.op_type != "Heaviside":
        return False
    tie = attr(step, "tie", "ge")
    if compare.op_type != ("GreaterOrEqual" if tie == "ge" else "Greater"):
        return False
    try:
        membrane, theta = membrane_of(step)
    except UnsupportedLayer:
        return False
    bound = const_array(compare.inputs[1])
    return compare.inputs[0] is membrane and bound is not None and bool(np.all(bound.astype(np.float32) == theta))


def reset_kind(value: ir.Value, membrane: ir.Value, spike: ir.Value) -> str | None:
    """How ``value`` is the membrane after its spike: "zero", "subtract", "none", or None when it is not."""
    if value is membrane:
        return "none"
    mul, where, sub = _producer(value, "Mul"), _producer(value, "Where"), _producer(value, "Sub")
    if mul is not None and membrane in mul.inputs:
        other = mul.inputs[1] if mul.inputs[0] is membrane else mul.inputs[0]
        inverse = _producer(other, "Sub")
        if inverse is not None and is_constant(inverse.inputs[0], 1.0) and inverse.inputs[1] is spike:
            return "zero"
    if where is not None and where.inputs[2] is membrane and is_constant(where.inputs[1], 0.0) \
            and _reads_spike(where.inputs[0], spike):
        return "zero"
    taken = _producer(where.inputs[1], "Sub") if where is not None else None
    if taken is not None and taken.inputs[0] is membrane and where.inputs[2] is membrane \
            and _reads_spike(where.inputs[0], spike):
        return "subtract"  # where(s > 0, v − θ, v)
    if sub is not None and sub.inputs[0] is membrane:
        taken = sub.inputs[1]
        scaled = _producer(taken, "Mul")
        if taken is spike or (scaled is not None and spike in scaled.inputs):
            return "subtract"
    return None


def membrane_of(step: ir.Node) -> tuple[ir.Value, np.ndarray]:
    """(the membrane the step reads, the threshold it fires at): ``step(V − c, θ)`` fires at V ≥ c + θ exactly
    when one of c, θ is zero (the sign of a float32 difference is exact)."""
    x, theta = step.inputs[0], const_array(step.inputs[1])
    if theta is None:
        raise UnsupportedLayer(step.outputs[0].name, "its threshold is computed at run time")
    theta = theta.astype(np.float32)
    sub = _producer(x, "Sub")
    offset = const_array(sub.inputs[1]) if sub is not None else None
    if sub is not None and offset is not None:
        if np.any(theta != 0) and np.any(offset != 0):
            raise UnsupportedLayer(step.outputs[0].name, "it subtracts a constant and then compares with a second "
                                   "threshold; their float32 sum is not exact")
        return sub.inputs[0], (theta + offset.astype(np.float32)).astype(np.float32)
    return x, theta


def lif_at(step: ir.Node, previous: ir.Node, spec: StepSpec) -> Neuron:
    """The LIF layer of ``step`` (call k ≥ 1), given the same site's step at call k − 1."""
    membrane, theta = membrane_of(step)
    before, _ = membrane_of(previous)
    spike_before = previous.outputs[0]
    add = _producer(membrane, "Add")
    if add is None:
        taken = _producer(membrane, "Sub")
        if taken is not None and reset_kind(membrane, taken.inputs[0], spike_before) == "subtract":  # type: ignore[arg-type]
            scaled = _producer(taken.inputs[1], "Mul")
            if scaled is not None and taken.inputs[0] in scaled.inputs:  # f − s·f: RLeaky's, Lapicque's zero reset
                raise InexpressibleLif(spec.site, "its membrane is zeroed after the input is added (f − s·f, "
                                       "snnTorch's RLeaky and Lapicque zero reset), which loses the input of the "
                                       "step after a spike; a NIR LIF resets before it integrates (snnTorch: "
                                       "snn.Leaky(reset_mechanism='zero') resets so)")
            raise InexpressibleLif(spec.site, SUBTRACT_RESET)  # snnTorch's form: (β·v + I) − θ·s
        raise NotALif(spec.site, "its membrane is not the sum of a leaky state and an input current")
    for state, current in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        leak, reset = 1.0, reset_kind(state, before, spike_before)  # type: ignore[arg-type]
        mul = _producer(state, "Mul")
        if reset is None and mul is not None:
            for r, factor in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
                found, constant = reset_kind(r, before, spike_before), _leak(factor)  # type: ignore[arg-type]
                if found is not None and constant is not None:
                    leak, reset = constant, found
                    break
        if reset == "subtract":
            raise UnsupportedLayer(spec.site, SUBTRACT_RESET)
        if reset == "none":
            raise UnsupportedLayer(spec.site, "its membrane is never reset; a NIR LIF resets after every spike")
        if reset == "zero":
            if not np.all((np.asarray(leak) >= 0.0) & (np.asarray(leak) <= 1.0)):
                raise UnsupportedLayer(spec.site, f"leak {leak_text(leak)} is outside [0, 1]")
            return Neuron(spec.site, "lif", current, theta, spec.tie, leak)  # type: ignore[arg-type]
    raise NotALif(spec.site, "no leaky, reset membrane state was found between its time steps")


def _constant_state(value: ir.Value | None) -> float | None:
    """The value everywhere of a state computed from constants alone (``zeros``, ``full``, times a leak), else None."""
    array = filled(value)
    node = value.producer() if value is not None else None
    if array is not None:
        return float(array.reshape(-1)[0]) if array.size and np.all(array == array.reshape(-1)[0]) else np.nan
    if node is not None and node.op_type == "Mul":
        parts = [_constant_state(v) for v in node.inputs]
        if any(p is None for p in parts):
            return None
        return 0.0 if 0.0 in parts else float(np.prod(parts))  # zeros times a leak per neuron (NaN: not uniform)
    return None


def lif_first(step: ir.Node, spec: StepSpec, leak: float) -> Neuron:
    """The LIF layer of ``step`` at call 0 (``leak`` as recognised at the later calls): a NIR LIF starts at v = 0,
    so the membrane must be the input current alone, or λ·0 + I."""
    membrane, theta = membrane_of(step)
    add = _producer(membrane, "Add")
    for state, current in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])) if add is not None else ():
        start = _constant_state(state)
        if start == 0.0:
            return Neuron(spec.site, "lif", current, theta, spec.tie, leak)  # type: ignore[arg-type]
        if start is not None:
            raise UnsupportedLayer(spec.site, "its membrane starts from a non-zero state; a NIR LIF starts at v = 0")
    return Neuron(spec.site, "lif", membrane, theta, spec.tie, leak)


def threshold_at(step: ir.Node, spec: StepSpec) -> Neuron:
    x, theta = membrane_of(step)
    return Neuron(spec.site, "threshold", x, theta, spec.tie)


def steps_by_weights(graph: ir.Graph, steps: tuple[StepSpec, ...]) -> tuple[StepSpec, ...] | None:
    """A traced (TorchScript) graph names each step after its op, so one LIF layer's calls at successive time steps
    look like separate sites. Steps whose inputs reach the same weights (stopping at other steps), with the same
    threshold and tie, are taken as one layer, its calls in graph order: the steps renamed (site, call). None when
    no layer is called more than once, or the layers are called different numbers of times."""
    nodes = list(graph)
    producers = {n.outputs[0].name: n for n in nodes if n.outputs}
    order = {n.outputs[0].name: i for i, n in enumerate(nodes) if n.outputs}
    stop = {s.tensor for s in steps}
    groups: dict[tuple, list[StepSpec]] = {}
    for spec in sorted(steps, key=lambda s: order.get(s.tensor, -1)):
        step = producers.get(spec.tensor)
        theta = const_array(step.inputs[1]) if step is not None else None
        if step is None or theta is None:
            return None
        key = (_weights_behind(step.inputs[0], stop), theta.astype(np.float32).tobytes(), spec.tie)
        groups.setdefault(key, []).append(spec)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1 or sizes == {1}:
        return None
    sites: list[str] = []
    for g in groups.values():  # a hand-written loop's layers share their module's site: number the later ones
        sites.append(g[0].site if g[0].site not in sites else f"{g[0].site}_{len(sites)}")
    return tuple(StepSpec(s.tensor, site, s.op, s.tie, k) for site, g in zip(sites, groups.values()) for k, s in enumerate(g))


def _weights_behind(value: ir.Value | None, stop: set[str]) -> frozenset[str]:
    """Names of the weight tensors (constants of more than one element) that ``value`` is computed from, not
    looking past the tensors in ``stop``."""
    found, seen, todo = set(), set(), [value]
    while todo:
        v = todo.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.const_value is not None:
            if v.const_value.size > 1 and v.name:
                found.add(v.name)
            continue
        node = v.producer()
        if node is not None and v.name not in stop:
            todo.extend(node.inputs)
    return frozenset(found)

