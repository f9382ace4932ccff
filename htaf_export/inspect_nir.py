"""``htaf-export inspect FILE.nir``: the nodes of a NIR file, its neurons' parameters and what forward Euler makes
of them, and (for files this tool wrote) which model site each neuron came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import metadata as md
from .runtimes.nir_file import graph_metadata, leak_text, load_graph

NEURONS = ("LIF", "LI", "IF", "CubaLIF", "CubaLI")
DEFAULT_DT = 1e-4  # a file not written by this tool: the dt snnTorch assumes


def _values(array) -> str:
    """One number when every neuron shares it, else the range."""
    a = np.asarray(array, dtype=np.float64)
    if a.size == 0:
        return "-"
    lo, hi = float(a.min()), float(a.max())
    return f"{lo:.9g}" if lo == hi else f"{lo:.6g} … {hi:.6g}"


def _shape(node) -> str:
    for key in ("weight", "threshold", "v_threshold", "scale"):
        value = getattr(node, key, None)
        if value is not None:
            return "×".join(str(d) for d in np.shape(value))
    shape = (getattr(node, "input_type", None) or {}).get("input")
    return "×".join(str(int(d)) for d in np.atleast_1d(shape)) if shape is not None else ""


def _neuron_row(name: str, node, dt: float) -> list[str]:
    kind = type(node).__name__
    tau = np.asarray(getattr(node, "tau", getattr(node, "tau_mem", np.inf)), dtype=np.float64)
    beta = np.ones_like(tau) if kind == "IF" else 1.0 - dt / tau
    gain = np.asarray(node.r, dtype=np.float64) * (dt if kind == "IF" else dt / tau)
    return [escape(name), kind, _values(np.float32(beta)), _values(np.float32(gain)),
            _values(getattr(node, "v_threshold", [])), _values(getattr(node, "v_reset", []))]


def render_nir(path: Path, console: Console) -> None:
    graph = load_graph(path)
    meta = graph_metadata(graph)
    dt = float(json.loads(meta[md.NIR_DT])) if md.NIR_DT in meta else DEFAULT_DT
    console.print(f"[bold]{escape(str(path))}[/bold]: NIR graph, {len(graph.nodes)} nodes, {len(graph.edges)} edges")
    if md.SOURCE_SHA256 in meta:
        console.print(f"written by htaf-export {escape(meta.get(md.VERSION, '?'))} from sha256 "
                      f"{meta[md.SOURCE_SHA256][:12]}… (family {escape(meta.get(md.FAMILY, '?'))}), tie "
                      f"{escape(meta.get(md.TIE, '?'))}")
    feeds = {dst: sorted(s for s, d in graph.edges if d == dst) for dst in graph.nodes}
    nodes = Table(title="nodes", title_justify="left")
    for column in ("node", "type", "shape", "from"):
        nodes.add_column(column, overflow="fold")
    for name in _topological(graph):
        node = graph.nodes[name]
        nodes.add_row(escape(name), type(node).__name__, _shape(node), escape(", ".join(feeds[name])))
    console.print(nodes)
    neurons = [n for n in graph.nodes if type(graph.nodes[n]).__name__ in NEURONS + ("Threshold",)]
    if neurons:
        console.print(_neuron_table(graph, neurons, dt))
    if md.NIR_SPIKES in meta:
        console.print(_mapping_table(meta))
        steps = int(json.loads(meta.get(md.NIR_TIME_STEPS, "1")))
        readout = json.loads(meta[md.NIR_READOUT])
        combine = "; ".join(f"{k}: {_combined(v)}" for k, v in sorted(readout.items()))
        streamed = json.loads(meta.get(md.NIR_TIME_INPUTS, "{}"))
        feeding = (f"inputs {', '.join(sorted(streamed))} one step at a time" if streamed
                   else "the same input at every step")
        console.print(f"time steps: {steps} at dt = {dt:g} s, {escape(feeding)}; outputs: {escape(combine)}")


def _neuron_table(graph, neurons: list[str], dt: float) -> Table:
    table = Table(title=f"neurons (forward Euler at dt = {dt:g} s: v ← β·v + g·I)", title_justify="left")
    for column in ("node", "type", "β", "g", "v_thr", "v_reset"):
        table.add_column(column, overflow="fold")
    for name in neurons:
        node = graph.nodes[name]
        if type(node).__name__ == "Threshold":
            table.add_row(escape(name), "Threshold", "-", "-", _values(node.threshold), "-")
        else:
            table.add_row(*_neuron_row(name, node, dt))
    return table


def _mapping_table(meta: dict[str, str]) -> Table:
    spikes = json.loads(meta[md.NIR_SPIKES])
    steps = {s["tensor"]: s for s in json.loads(meta[md.STEPS])}
    table = Table(title="mapping: NIR neuron ← model step site", title_justify="left")
    for column in ("node", "site", "tie", "spike tensors"):
        table.add_column(column, overflow="fold")
    for node, tensors in sorted(spikes.items()):
        named = [t for t in tensors if t]
        first = steps.get(named[0], {}) if named else {}
        shown = named[0] if len(named) == 1 else f"{named[0]} … {named[-1]} ({len(named)})" if named else "-"
        table.add_row(escape(node), escape(first.get("site", "?")), first.get("tie", "?"), escape(shown))
    return table


def _topological(graph) -> list[str]:
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(graph.nodes):
        ready = [n for n in sorted(graph.nodes) if n not in placed
                 and all(s in placed for s, d in graph.edges if d == n)]
        if not ready:  # a cycle: the rest in name order
            ready = [n for n in sorted(graph.nodes) if n not in placed]
        order += ready
        placed.update(ready)
    return order


def _combined(how: dict) -> str:
    """How an output's per-step values make the output: summed (÷ T for a mean), stacked, or one pass."""
    state = f"LI state (leak {leak_text(how['leak'])}), " if "leak" in how else ""
    if how["combine"] == "stack":
        return state + f"every step's value, stacked on axis {how['axis']}"
    if how["combine"] == "sum":
        return state + "sum over steps" + (f" ÷ {how['divide_by']:g}" if "divide_by" in how else "")
    return "one pass"
