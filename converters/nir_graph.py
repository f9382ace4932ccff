"""One time step of the IR as NIR nodes and edges: neurons (``nir_neurons``) and the layers between them.

NIR shapes are per sample (no batch axis). A node is named after what it came from: a neuron after its site, a
weighted layer after its weights' module, so the summary, the file and a failing validation all say the same name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer
from htaf_export.ops import HTAF_DOMAIN
from htaf_export.passes.util import attr, const_array, layer_of
from htaf_export.runtimes.nir_file import leak_text

from .batch_transposes import read_axis
from .nir_neurons import Neuron

DT = 1e-4  # seconds per time step; snnTorch's importer assumes it (docs/nir.md)
NEVER_LEAKS_TAU = 1e30  # a leak of exactly 1: β = 1 − DT/τ is 1.0 in float64


def node_name(text: str) -> str:
    """A NIR node name that every consumer accepts as a module name (snnTorch rejects dots)."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)


def lif_parameters(leak: float | np.ndarray, threshold: np.ndarray, tie: str, shape: tuple[int, ...]
                   ) -> dict[str, np.ndarray]:
    """τ, r, v_leak, v_threshold, v_reset such that forward Euler with ``DT`` is v ← leak·v + I, fire at v > v_thr.

    τ = DT/(1 − leak) in float64 gives back 1 − DT/τ = leak exactly after rounding to float32; r = τ/DT makes the
    input's factor r·DT/τ one. A ``ge`` site fires at v ≥ θ, which for float32 v is v > (the float32 below θ)."""
    leaks = np.asarray(leak, np.float32)
    lam = np.broadcast_to(leaks.reshape(_broadcastable(leaks, shape)), shape).astype(np.float64)
    tau = np.divide(DT, 1.0 - lam, out=np.full(shape, NEVER_LEAKS_TAU, np.float64), where=lam != 1.0)
    return {"tau": tau, "r": tau / DT, "v_leak": np.zeros(shape, np.float32),
            "v_threshold": fire_threshold(threshold, tie, shape), "v_reset": np.zeros(shape, np.float32)}


def fire_threshold(threshold: np.ndarray, tie: str, shape: tuple[int, ...]) -> np.ndarray:
    theta = np.broadcast_to(threshold.astype(np.float32).reshape(_broadcastable(threshold, shape)), shape)
    return np.ascontiguousarray(np.nextafter(theta, np.float32(-np.inf)) if tie == "ge" else theta, dtype=np.float32)


def _broadcastable(array: np.ndarray, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape of a threshold written for a batched tensor (leading batch axis of 1 dropped)."""
    dims = tuple(array.shape)
    while len(dims) > len(shape) and dims[0] == 1:
        dims = dims[1:]
    return dims


def inferred_shapes(model: ir.Model) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of every tensor, from ONNX shape inference on a copy whose steps are stood in for by
    ``Sub`` (same shape, standard op): a TorchScript capture carries few shapes of its own."""
    import onnx

    proto = ir.to_proto(model)
    for node in proto.graph.node:
        if node.domain == HTAF_DOMAIN:
            node.domain, node.op_type = "", "Sub"
            del node.attribute[:]
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 — shapes are a help here; a tensor still without one is refused by name
        return {}
    shapes = {}
    for info in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]:
        dims = info.type.tensor_type.shape.dim[1:]
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def sample_shape(value: ir.Value, known: dict[str, tuple[int, ...]] | None = None) -> tuple[int, ...]:
    dims = value.shape.dims[1:] if value.shape is not None else None
    if dims is not None and all(isinstance(d, int) for d in dims):
        return tuple(dims)  # type: ignore[arg-type]
    if known and value.name in known:
        return known[value.name]
    raise UnsupportedLayer(value.name or "tensor", "its shape is not known apart from the batch size")


@dataclass
class SliceGraph:
    """The NIR nodes and edges of one time step ``call``; ``neurons`` by the tensor they write."""

    graph: ir.Graph
    call: int
    neurons: dict[str, Neuron]
    spikes_elsewhere: dict[str, str]  # step tensors of other calls → their site (reading one is a delay)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-sample shapes the IR does not carry
    time_steps: int = 1
    time_axes: dict[str, int | None] = field(default_factory=dict)  # Input node → its time axis (per sample), if any
    nodes: dict = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    _named: dict[int, str] = field(default_factory=dict)

    def build(self, outputs: dict[str, ir.Value], leaks: dict[str, float | list[float]] | None = None) -> None:
        """Nodes for every neuron and output; an output named in ``leaks`` reads a leaky integrator (NIR ``LI``)
        fed by its value, with that leak."""
        import nir

        for tensor in self.neurons:
            self._named[id(self._value(tensor))] = self.neuron_node(tensor)
        for tensor, neuron in self.neurons.items():
            self._add_neuron(tensor, neuron)
        for name, value in outputs.items():
            out, shape = node_name(name), self.shape(value)
            self.nodes[out] = nir.Output(np.array(shape))
            source = self.source(value)
            if leaks and name in leaks:
                readout = self._unique(f"{name}_readout")
                lif = lif_parameters(leaks[name], np.float32(0), "gt", shape)
                self.nodes[readout] = nir.LI(tau=lif["tau"], r=lif["r"], v_leak=lif["v_leak"])
                self.rows.append((f"{name} (readout)", f"LI (leak {leak_text(leaks[name])}, no reset)",
                                  "its state is the output"))
                self.edges.append((source, readout))
                source = readout
            self.edges.append((source, out))

    def shape(self, value: ir.Value) -> tuple[int, ...]:
        return sample_shape(value, self.shapes)

    def neuron_node(self, tensor: str) -> str:
        """A neuron is named after its site, or after its step tensor when a site is several layers (a step
        function called once per layer)."""
        site = self.neurons[tensor].site
        shared = sum(n.site == site for n in self.neurons.values()) > 1
        return node_name(tensor if shared else site)

    def _value(self, tensor: str) -> ir.Value:
        for node in self.graph:
            for out in node.outputs:
                if out.name == tensor:
                    return out
        raise UnsupportedLayer(tensor, "the step tensor is not in the graph")

    def _add_neuron(self, tensor: str, neuron: Neuron) -> None:
        import nir

        name, shape = self.neuron_node(tensor), self.shape(self._value(tensor))
        if neuron.kind == "lif":
            self.nodes[name] = nir.LIF(**lif_parameters(neuron.leak, neuron.threshold, neuron.tie, shape))  # type: ignore[arg-type]
            what = f"LIF (leak {leak_text(neuron.leak)}, zero reset, threshold {_describe(neuron)})"  # type: ignore[arg-type]
        else:
            self.nodes[name] = nir.Threshold(fire_threshold(neuron.threshold, neuron.tie, shape))
            what = f"Threshold ({_describe(neuron)})"
        self.rows.append((tensor if name == node_name(tensor) else neuron.site, what, "ge → v_thr = float32 below θ" if neuron.tie == "ge" else ""))
        self.edges.append((self.source(neuron.current), name))

    def source(self, value: ir.Value) -> str:
        """The NIR node whose output is ``value``, adding it (and what feeds it) on first sight."""
        if id(value) in self._named:
            return self._named[id(value)]
        if value.name in self.spikes_elsewhere:
            raise UnsupportedLayer(self.spikes_elsewhere[value.name], "another layer reads its spikes of a different "
                                   "time step (a delay or recurrent connection), which is not exported yet")
        if value.is_graph_input():
            return self._input(value, None)
        node = value.producer()
        if node is None:
            raise UnsupportedLayer(value.name or "tensor", "it is a constant, not a layer's output")
        if node.op_type == "Identity":
            return self.source(node.inputs[0])  # type: ignore[arg-type]
        picked = _time_step_of(node) if self.time_steps > 1 else None
        if picked is not None:
            data, index = picked
            if index != self.call:
                raise UnsupportedLayer(data.name or "input", f"time step {self.call} reads its step {index}")
            self._named[id(value)] = self._input(data, 0)
            return self._named[id(value)]
        made, what, feeds = self._layer(node)
        name = self._unique(what)
        self.nodes[name] = made
        self.rows.append((what, type(made).__name__, _shape_text(made)))
        self.edges.append((self.source(feeds), name))
        self._named[id(value)] = name
        return name

    def _input(self, value: ir.Value, time_axis: int | None) -> str:
        """The NIR ``Input`` of a graph input, read whole at every step or (``time_axis``) one step at a time."""
        import nir

        name = node_name(value.name or "input")
        if name in self.nodes and self.time_axes.get(name) != time_axis:
            raise UnsupportedLayer(value.name or "input", "it is read both whole and one time step at a time")
        if name not in self.nodes:
            shape = self.shape(value)
            per_step = shape if time_axis is None else shape[:time_axis] + shape[time_axis + 1:]
            self.nodes[name] = nir.Input(np.array(per_step))
            self.time_axes[name] = time_axis
        self._named[id(value)] = name
        return name

    def _unique(self, wanted: str) -> str:
        name, k = node_name(wanted), 1
        while name in self.nodes:
            name, k = f"{node_name(wanted)}_{k}", k + 1
        return name

    def _layer(self, node: ir.Node):
        """(NIR node, its name, the value that feeds it) for one IR node between neurons."""
        import nir

        op, x = node.op_type, node.inputs[0]
        weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if op == "Gemm" and weight is not None and attr(node, "transA", 0) == 0 \
                and attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0:
            w = weight if attr(node, "transB", 0) else weight.T
            bias = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
            made = nir.Affine(w.astype(np.float32), bias.astype(np.float32)) if bias is not None \
                else nir.Linear(w.astype(np.float32))
            return made, layer_of(node.inputs[1].name), x
        if op == "MatMul" and weight is not None and weight.ndim == 2:
            return nir.Linear(np.ascontiguousarray(weight.T, dtype=np.float32)), layer_of(node.inputs[1].name), x
        if op == "Conv" and weight is not None and weight.ndim in (3, 4):
            return self._conv(node, weight), layer_of(node.inputs[1].name), x
        if op == "AveragePool":
            return self._pool(node), "avg_pool", x
        if op in ("Flatten", "Reshape") and len(self.shape(node.outputs[0])) == 1 \
                and int(np.prod(self.shape(x))) == self.shape(node.outputs[0])[0]:
            if op == "Flatten" and attr(node, "axis", 1) != 1:
                raise UnsupportedLayer(node.name or op, "it flattens across the batch axis")
            return nir.Flatten({"input": np.array(self.shape(x))}, start_dim=0, end_dim=-1), "flatten", x
        if op == "Mul" and weight is not None:
            shape = self.shape(node.outputs[0])
            scale = np.broadcast_to(weight.astype(np.float32).reshape(_broadcastable(weight, shape)), shape)
            constant = next((v.name for v in node.inputs if v is not None and v.const_value is not None), None)
            # named by its constant, which every time step shares (the node's own name differs per step)
            return nir.Scale(np.ascontiguousarray(scale)), f"scale_{constant or node.name or 'x'}", x
        if op == "Add" and all(const_array(v) is None for v in node.inputs):
            raise UnsupportedLayer(node.name or op, "it adds two computed tensors (a residual sum, or a recurrent "
                                   "input such as rec(spk) beside the feed-forward one): NIR graphs written here are "
                                   "feed-forward between neurons, and a membrane carried between time steps is "
                                   "recognised only in the forms docs/nir.md lists")
        raise UnsupportedLayer(node.name or op, f"{op} has no NIR node that computes it exactly "
                               "(NIR carries Affine/Linear, Conv1d, Conv2d, AvgPool2d, Flatten and Scale between neurons)")

    def _conv(self, node: ir.Node, weight: np.ndarray):
        import nir

        dims = weight.ndim - 2
        pads = list(attr(node, "pads", [0] * 2 * dims))
        if pads[:dims] != pads[dims:] or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise UnsupportedLayer(layer_of(node.inputs[1].name), f"asymmetric padding has no NIR Conv{dims}d form")
        bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        bias = np.zeros(weight.shape[0], np.float32) if bias is None else bias
        made = nir.Conv2d if dims == 2 else nir.Conv1d
        spatial = self.shape(node.inputs[0])[1:]
        strides, dilations = attr(node, "strides", [1] * dims), attr(node, "dilations", [1] * dims)
        # Conv1d's fields are plain ints in NIR (Conv2d's are pairs)
        one = (lambda v: tuple(v)) if dims == 2 else (lambda v: int(v[0]))
        return made(input_shape=one(spatial),
                    weight=_ungrouped(weight, int(attr(node, "group", 1))), stride=one(strides),
                    padding=one(pads[:dims]), dilation=one(dilations), groups=1, bias=bias.astype(np.float32))

    def _pool(self, node: ir.Node):
        import nir

        pads = list(attr(node, "pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:] or attr(node, "ceil_mode", 0) or (any(pads) and not attr(node, "count_include_pad", 0)):
            raise UnsupportedLayer(node.name or "AveragePool", "only symmetric, floor-mode average pooling that counts "
                                   "its padding has a NIR AvgPool2d form")
        return nir.AvgPool2d(kernel_size=np.array(attr(node, "kernel_shape", [1, 1])),
                             stride=np.array(attr(node, "strides", [1, 1])), padding=np.array(pads[:2]))

    def digest(self) -> str:
        """What this time step computes, names included: equal digests mean the same network."""
        h = hashlib.sha256(repr(sorted(self.edges)).encode())
        for name in sorted(self.nodes):
            h.update(name.encode() + type(self.nodes[name]).__name__.encode())
            for key, value in sorted(vars(self.nodes[name]).items()):
                h.update(key.encode() + (np.asarray(value).tobytes() if isinstance(value, np.ndarray) else repr(value).encode()))
        return h.hexdigest()


def _time_step_of(node: ir.Node) -> tuple[ir.Value, int] | None:
    """(graph input, k) when ``node`` is ``input[:, k]``: a Gather of one constant index on axis 1 of a graph input
    (or of a whole-batch Slice of it), as a loop over an event stream writes ``x[:, t]``, or a one-index Slice of
    axis 1 squeezed (``for x_t in x.unbind(1)``; a time-first ``for x_t in x`` becomes it, see batch_transposes)."""
    if node.op_type == "Squeeze":
        return _squeezed_step(node)
    if node.op_type != "Gather" or attr(node, "axis", 0) != 1:
        return None
    index = const_array(node.inputs[1])
    data = node.inputs[0]
    sliced = data.producer() if data is not None else None
    if sliced is not None and sliced.op_type == "Slice":
        starts, axes = const_array(sliced.inputs[1]), const_array(sliced.inputs[3]) if len(sliced.inputs) > 3 else None
        if starts is None or np.any(starts != 0) or (axes is not None and np.any(axes != 0)):
            return None
        data = sliced.inputs[0]
    if index is None or index.ndim != 0 or data is None or not data.is_graph_input():
        return None
    return data, int(index)


def _squeezed_step(node: ir.Node) -> tuple[ir.Value, int] | None:
    sliced = node.inputs[0].producer() if node.inputs[0] is not None else None
    data = sliced.inputs[0] if sliced is not None and sliced.op_type == "Slice" else None
    if data is None or not data.is_graph_input() or data.shape is None or read_axis(sliced, len(data.shape)) != 1:
        return None
    start = const_array(sliced.inputs[1])  # type: ignore[union-attr]
    return (data, int(start.reshape(-1)[0])) if start is not None else None


def _shape_text(made) -> str:
    weight = getattr(made, "weight", None)
    return "weights " + "×".join(str(d) for d in weight.shape) if weight is not None else ""


def _describe(neuron: Neuron) -> str:
    theta = np.unique(neuron.threshold)
    return f"θ {float(theta[0]):g}" if theta.size == 1 else f"θ per neuron ({theta.size} values)"


def _ungrouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped (or depthwise) conv's weight as the block-diagonal weight of one ungrouped conv: the same sums
    (the other groups' terms are exact zeros). NIR readers differ in how they treat ``groups`` (nir 1.0.8's own
    type check ignores it), an ungrouped Conv2d every one reads alike."""
    weight = weight.astype(np.float32)
    if groups == 1:
        return weight
    out_c, per_group = weight.shape[:2]
    dense = np.zeros((out_c, per_group * groups, *weight.shape[2:]), np.float32)
    step = out_c // groups
    for g in range(groups):
        dense[g * step:(g + 1) * step, g * per_group:(g + 1) * per_group] = weight[g * step:(g + 1) * step]
    return dense
