"""``nir-sim``: this project's own float32 NIR simulator, written from the NIR node definitions, not from the
converter: it reads only the file. It runs every node htaf-export writes (``Threshold`` included, which snnTorch
cannot load) and the other feed-forward NIR nodes with an exact float32 meaning.

Neurons step by forward Euler at the file's dt, coefficients computed in float64 and rounded once to float32:

    LIF / LI:  v ← β·v + g·I + l      β = 1 − dt/τ,  g = r·dt/τ,  l = (dt/τ)·v_leak     (g·I only when g ≠ 1,
    IF:        v ← v + g·I            g = r·dt                                            l only when l ≠ 0)
    LIF / IF fire where v > v_threshold, then v ← v_reset there; Threshold is H(x − θ) with H(0) = 0.

Several edges into one node are summed in the order of their source names.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from .. import metadata as md
from ..errors import BadInput
from . import ArtifactInfo
from .nir_file import NirRunner

NAME = "nir-sim"


def _order(nodes: dict, edges: list[tuple[str, str]]) -> list[str]:
    """Nodes in an order where every node comes after its sources; a cycle is refused."""
    incoming = {n: sorted(s for s, d in edges if d == n) for n in nodes}
    done: list[str] = []
    placed: set[str] = set()
    while len(done) < len(nodes):
        ready = [n for n in sorted(nodes) if n not in placed and all(s in placed for s in incoming[n])]
        if not ready:
            raise BadInput("the NIR graph has a cycle (recurrent connection); nir-sim runs feed-forward graphs only")
        done += ready
        placed.update(ready)
    return done


def _f32(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array, dtype=np.float32)))


class Neuron:
    """The state and update of one LIF, LI or IF node."""

    def __init__(self, node, dt: float) -> None:
        kind = type(node).__name__
        tau = np.asarray(getattr(node, "tau", np.inf), dtype=np.float64)
        r = np.asarray(node.r, dtype=np.float64)
        self.fires = kind in ("LIF", "IF")
        self.beta = _f32(np.ones_like(r) if kind == "IF" else 1.0 - dt / tau)
        gain = r * dt if kind == "IF" else r * dt / tau
        self.gain = None if np.all(gain.astype(np.float32) == 1) else _f32(gain)
        leak = np.zeros_like(r) if kind == "IF" else (dt / tau) * np.asarray(node.v_leak, dtype=np.float64)
        self.leak = _f32(leak) if np.any(leak.astype(np.float32) != 0) else None
        self.threshold = _f32(node.v_threshold) if self.fires else None
        self.reset_to = _f32(getattr(node, "v_reset", np.zeros_like(r))) if self.fires else None
        self.v: torch.Tensor | None = None

    def __call__(self, current: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(current) if self.v is None else self.v
        v = self.beta * v + (current if self.gain is None else self.gain * current)
        if self.leak is not None:
            v = v + self.leak
        if not self.fires:
            self.v = v
            return v
        spikes = v > self.threshold
        self.v = torch.where(spikes, self.reset_to.expand_as(v), v)
        return spikes.to(torch.float32)


def _layer(node):
    """A function of one input tensor (batch first) for a stateless node."""
    kind = type(node).__name__
    if kind == "Affine":
        w, b = _f32(node.weight), _f32(node.bias)
        return lambda x: F.linear(x, w, b)
    if kind == "Linear":
        w = _f32(node.weight)
        return lambda x: F.linear(x, w)
    if kind == "Scale":
        s = _f32(node.scale)
        return lambda x: x * s
    if kind in ("Conv1d", "Conv2d"):
        w, b = _f32(node.weight), _f32(node.bias)
        conv = F.conv1d if kind == "Conv1d" else F.conv2d
        pad = node.padding if isinstance(node.padding, str) else tuple(int(p) for p in np.atleast_1d(node.padding))
        return lambda x: conv(x, w, b, tuple(np.atleast_1d(node.stride).tolist()), pad,
                              tuple(np.atleast_1d(node.dilation).tolist()), int(node.groups))
    if kind in ("AvgPool2d", "SumPool2d"):
        k, s, p = (tuple(int(v) for v in np.atleast_1d(a)) for a in (node.kernel_size, node.stride, node.padding))
        divisor = 1 if kind == "SumPool2d" else None
        return lambda x: F.avg_pool2d(x, k, s, p, divisor_override=divisor)
    if kind == "Flatten":
        start, end = int(node.start_dim), int(node.end_dim)
        return lambda x: x.flatten(start + 1, end if end < 0 else end + 1)  # NIR shapes have no batch axis
    if kind == "Threshold":
        t = _f32(node.threshold)
        return lambda x: (x > t).to(torch.float32)
    raise BadInput(f"nir-sim cannot run a NIR {kind} node")


class NirSimRunner(NirRunner):
    name = NAME

    def __init__(self, info: ArtifactInfo) -> None:
        super().__init__(info)
        graph = self.graph
        dt = float(json.loads(info.metadata[md.NIR_DT]))
        self.edges = list(graph.edges)
        self.order = _order(graph.nodes, self.edges)
        self.kinds = {n: type(node).__name__ for n, node in graph.nodes.items()}
        self.neurons = {n: node for n, node in graph.nodes.items() if self.kinds[n] in ("LIF", "LI", "IF")}
        self.layers = {n: _layer(node) for n, node in graph.nodes.items()
                       if self.kinds[n] not in ("LIF", "LI", "IF", "Input", "Output")}
        self.dt = dt
        self.state: dict[str, Neuron] = {}

    def _reset(self) -> None:
        self.state = {n: Neuron(node, self.dt) for n, node in self.neurons.items()}

    def _step(self, feed: dict[str, np.ndarray]):
        values: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for n in self.order:
                sources = sorted(s for s, d in self.edges if d == n)
                if self.kinds[n] == "Input":
                    values[n] = torch.from_numpy(feed[n])
                    continue
                x = values[sources[0]]
                for s in sources[1:]:
                    x = x + values[s]
                values[n] = self.state[n](x) if n in self.state else self.layers[n](x) if n in self.layers else x
        outputs = {n: values[n].numpy() for n in self.order if self.kinds[n] == "Output"}
        spikes = {n: values[n].numpy() for n in self.order if self.kinds[n] in ("LIF", "IF", "Threshold")}
        return outputs, spikes
