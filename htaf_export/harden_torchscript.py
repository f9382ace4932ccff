"""Hardening a TorchScript module: its HTAF composites are rewritten in place, on a fresh copy, with TorchScript's
own subgraph rewriter; their steps become plain comparisons that capture lifts to ``htaf`` ops. Step modules of a
model hardened before tracing are read off their graphs."""

from __future__ import annotations

import io

import torch

from .errors import BadInput
from .harden_traced import TracedSite, as_number

_HTAF01 = """
graph(%x, %t, %k1, %a, %b, %k2):
  %u = aten::sub(%x, %t, %k1)
  %m = aten::mul(%u, %a)
  %th = aten::tanh(%u)
  %m2 = aten::mul(%th, %b)
  %z = aten::add(%m, %m2, %k2)
  %s = aten::sigmoid(%z)
  return (%s)"""
_STEP01 = """
graph(%x, %t, %k1, %a, %b, %k2):
  %g = aten::{op}(%x, %t)
  %f = aten::type_as(%g, %x)
  return (%f)"""
_TAIL = "%d = aten::mul({v}, %two)\n  %r = aten::sub(%d, %one, %k3)\n  return (%r)"


def _pm1(pattern: str, value: str) -> str:
    return pattern.replace("%k2):", "%k2, %two, %one, %k3):").replace(f"return ({value})", _TAIL.format(v=value))


def _constant(value) -> float | None:
    node = value.node()
    return as_number(node.output().toIValue()) if node.kind() == "prim::Constant" else None


def _ts_composites(graph) -> list[tuple[float, float, float, str]]:
    """(θ, α, β, levels) of each HTAF composite in a TorchScript graph (the ``_HTAF01`` shape)."""
    found = []
    for node in graph.nodes():
        muls = _sigmoid_terms(node)
        if muls is None:
            continue
        tanh_mul = next((m for m in muls if m.kind() == "aten::mul" and m.inputsAt(0).node().kind() == "aten::tanh"), None)
        lin_mul = next((m for m in muls if m is not tanh_mul and m.kind() == "aten::mul"), None)
        if tanh_mul is None or lin_mul is None or lin_mul.inputsAt(0).node().kind() != "aten::sub":
            continue
        sub = lin_mul.inputsAt(0).node()
        theta, alpha, beta = _constant(sub.inputsAt(1)), _constant(lin_mul.inputsAt(1)), _constant(tanh_mul.inputsAt(1))
        if None in (theta, alpha, beta) or not (alpha > 0 and beta >= 0):  # type: ignore[operator]
            continue
        uses = [u.user for u in node.output().uses()]
        pm1 = len(uses) == 1 and uses[0].kind() == "aten::mul"
        found.append((float(theta), float(alpha), float(beta), "pm1" if pm1 else "01"))  # type: ignore[arg-type]
    return found


def _ts_exact_steps(module: torch.jit.ScriptModule) -> list[TracedSite]:
    """The Step submodules of a TorchScript module (a model hardened before tracing), read off their graphs."""
    sites = []
    for path, sub in module.named_modules():
        if getattr(sub, "original_name", "") != "Step" or not hasattr(sub, "forward"):
            continue
        nodes = list(sub.forward.graph.nodes())
        cmp = next((n for n in nodes if n.kind() in ("aten::ge", "aten::gt")), None)
        theta = _constant(cmp.inputsAt(1)) if cmp is not None else None
        if cmp is None or theta is None:
            continue
        levels = "pm1" if any(n.kind() == "aten::mul" for n in nodes) else "01"
        sites.append(TracedSite(path, theta, levels, cmp.kind()[-2:], "Step module (TorchScript)"))
    return sites


def _ts_graphs(module: torch.jit.ScriptModule):
    """(path, method name, graph, whether the submodule has no children, its TorchScript type) of every method of
    every submodule: a submodule called several times (a shared activation, an SNN's spike at every time step) is
    traced into one method per call (forward, forward1, ...)."""
    for path, sub in module.named_modules():
        c = getattr(sub, "_c", None)
        leaf = next(iter(sub.children()), None) is None
        kind = c._type().qualified_name() if c is not None and hasattr(c, "_type") else path
        for method in c._method_names() if c is not None and hasattr(c, "_method_names") else []:
            graph = getattr(c._get_method(method), "graph", None)
            if graph is not None:
                yield path, method, graph, leaf, kind


def harden_torchscript(module: torch.jit.ScriptModule, tie: str | None) -> tuple[torch.jit.ScriptModule, list[TracedSite]]:
    """A fresh copy of a TorchScript module whose HTAF composites compute the exact step, and the sites."""
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    hard = torch.jit.load(buf, map_location="cpu")  # its own compilation unit: the original stays smooth
    op = "gt" if tie == "gt" else "ge"
    step01 = _STEP01.replace("{op}", op)
    sites: list[TracedSite] = []
    seen: dict[tuple[str, str], list] = {}  # scripted modules of one type and configuration share their graph
    for path, method, graph, leaf, kind in _ts_graphs(hard):
        first = (kind, method) not in seen
        if leaf and first:  # a scripted HTAF calls htaf_function: read its body (a parent's own graph is left as
            torch._C._jit_pass_inline(graph)  # it is: its children's would come in)
        found = seen.setdefault((kind, method), _ts_composites(graph) if first else [])
        where = path if method == "forward" else f"{path}.{method}" if path else method
        for k, (theta, alpha, beta, levels) in enumerate(found):
            name = where if len(found) == 1 else f"{where}@{k}"
            sites.append(TracedSite(name or "(root)", theta, levels, op, "HTAF composite", alpha, beta))
        if found and first:
            torch._C._jit_pass_custom_pattern_based_rewrite_graph(_pm1(_HTAF01, "%s"), _pm1(step01, "%f"), graph)
            torch._C._jit_pass_custom_pattern_based_rewrite_graph(_HTAF01, step01, graph)
            torch._C._jit_pass_dce(graph)
    sites += _ts_exact_steps(hard)
    leftover = [f"{p}.{m}" for p, m, g, _, _ in _ts_graphs(hard) if _ts_composites(g) or _composite_like(g)]
    if leftover:
        raise BadInput(f"TorchScript module {leftover[0]!r} computes an HTAF σ(α·u + β·tanh u) in a form this tool "
                       f"cannot rewrite in TorchScript (α or β read from a buffer or parameter, or another order of "
                       f"terms), so it would stay smooth; save a torch.export program (.pt2) or a pickle, where it "
                       f"is found, or harden before tracing")
    return hard, sites


def _sigmoid_terms(node) -> list | None:
    """The nodes of the two terms a sigmoid's sum adds, when ``node`` is a sigmoid of a sum; else None."""
    add = node.inputsAt(0).node() if node.kind() == "aten::sigmoid" else None
    return [add.inputsAt(i).node() for i in range(2)] if add is not None and add.kind() == "aten::add" else None


def _composite_like(graph) -> bool:
    """Whether a sigmoid in ``graph`` reads a sum with a multiple of a tanh: an HTAF, whatever holds α and β."""
    return any(t.kind() == "aten::mul" and any(t.inputsAt(i).node().kind() == "aten::tanh" for i in range(2))
               for node in graph.nodes() for t in _sigmoid_terms(node) or [])

