"""Hardening inside traced programs: torch.export graph modules (.pt2) and TorchScript modules.

A traced program no longer has HTAF modules to swap, only the operations they ran. Sites are found by
what they compute:

- the HTAF composite σ(α·u + β·tanh u), u = x − θ (or u = x), with α > 0, β ≥ 0 constants; its ±1 form
  2σ − 1. It becomes the exact step of x at θ under the declared tie rule (``--tie``, else ``ge``: a traced
  graph does not record the tie a smooth HTAF was given).
- in a .pt2 program, an exact step: (x ≥ θ) or (x > θ) cast to float, optionally 2·H − 1, or where(x ≥ θ,
  1, −1 or 0), written by hand or left by a surrogate-mode HTAF or a model hardened before export. Its tie
  is the comparison's.

In a graph module each site becomes a call of a ``Step`` submodule at the site's module path, so the
reference records it like any Step and the exporter emits the ``htaf`` op. A site inside a module that is
not an HTAF gets a child ``<path>.step`` (``step`` at the root). TorchScript modules are rewritten in
place (``harden_torchscript``).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from .errors import BadInput
from .nn import Step

aten = torch.ops.aten
CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default)
COMPARISONS = {aten.ge.Scalar: "ge", aten.gt.Scalar: "gt", aten.ge.Tensor: "ge", aten.gt.Tensor: "gt"}
SCOPES = ("HTAF", "Step")
# ops that pass a tensor on unchanged (a copy or a detach)
ALIASES = (aten.detach.default, aten.detach_.default, aten.alias.default, aten.clone.default,
           aten.lift_fresh_copy.default)


@dataclass(frozen=True)
class TracedSite:
    """One step site found in a traced program, and how it was found."""

    path: str
    threshold: float
    levels: str
    tie: str
    how: str
    alpha: float | None = None
    beta: float | None = None


def as_number(value) -> float | None:
    """A number, a one-element tensor, or a graph's one-element buffer or parameter (an annealed temperature
    ``self.alpha``, fixed once trained)."""
    if isinstance(value, fx.Node) and value.op == "get_attr" and value.graph.owning_module is not None:
        value = operator.attrgetter(str(value.target))(value.graph.owning_module)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.reshape(()))
    return None


def scope_of(node: fx.Node) -> tuple[str, str]:
    """(module path, type name) of the innermost module a node ran in; ("", "") at the root."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    return str(path), type_name(kind)


def type_name(kind: Any) -> str:
    """The class name of an ``nn_module_stack`` entry's type (a class, or its qualified name as a string)."""
    name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    return str(name).rsplit(".", 1)[-1].strip("'>")


def _only_user(node: fx.Node) -> fx.Node | None:
    users = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
    return users[0] if len(users) == 1 else None


def _scalar_arg(node: fx.Node, tensor: fx.Node) -> float | None:
    """The constant other operand of a binary op whose tensor operand is ``tensor``."""
    others = [a for a in node.args[:2] if a is not tensor]
    return as_number(others[0]) if len(others) == 1 else None


def _pm1_tail(out: fx.Node) -> list[fx.Node]:
    """[mul, sub] when ``out`` is only used as 2·out − 1, else []."""
    mul = _only_user(out)
    if mul is None or mul.target is not aten.mul.Tensor or _scalar_arg(mul, out) != 2.0:
        return []
    sub = _only_user(mul)
    if sub is None or sub.target is not aten.sub.Tensor or sub.args[0] is not mul or as_number(sub.args[1]) != 1.0:
        return []
    return [mul, sub]


@dataclass
class _Match:
    """The nodes of one step in the graph, the value it steps, and the site it is (its path set later)."""

    x: fx.Node
    nodes: list[fx.Node]
    site: TracedSite


def _composite(sig: fx.Node, tie: str) -> _Match | None:
    """σ(α·u + β·tanh u) at ``sig``, u = x − θ or x."""
    add = sig.args[0]
    if not isinstance(add, fx.Node) or add.target is not aten.add.Tensor or len(add.args) != 2:
        return None
    tanh = next((m.args[0] for m in add.args if isinstance(m, fx.Node) and m.target is aten.mul.Tensor
                 and isinstance(m.args[0], fx.Node) and m.args[0].target is aten.tanh.default), None)
    if tanh is None:
        return None
    u = tanh.args[0]
    mul_b = next(m for m in add.args if m.args[0] is tanh)
    mul_a = next((m for m in add.args if m is not mul_b and isinstance(m, fx.Node)
                  and m.target is aten.mul.Tensor and u in m.args[:2]), None)
    if mul_a is None:
        return None
    alpha, beta = _scalar_arg(mul_a, u), _scalar_arg(mul_b, tanh)
    if alpha is None or beta is None or not (alpha > 0 and beta >= 0):
        return None
    x, theta, nodes = u, 0.0, [mul_a, tanh, mul_b, add, sig]
    if u.target is aten.sub.Tensor and as_number(u.args[1]) is not None and isinstance(u.args[0], fx.Node):
        x, theta, nodes = u.args[0], as_number(u.args[1]), [u, *nodes]
    inside = set(nodes)
    if any(user not in inside for n in nodes[:-1] for user in n.users):
        return None  # an inner value is used elsewhere: not a self-contained step
    tail = _pm1_tail(sig)
    return _Match(x, nodes + tail, TracedSite("", float(theta), "pm1" if tail else "01", tie, "HTAF composite", alpha,
                                              beta))


def _fill_value(a) -> float | None:
    """A number, or a tensor filled with one number (ones_like, zeros_like, full_like, x.new_ones(()), torch.full
    …; negated or not), as users write the two branches of a hand-made sign: where(x ≥ 0, ones_like(x),
    −ones_like(x))."""
    if not isinstance(a, fx.Node):
        return as_number(a)
    if a.target is aten.neg.default:
        inner = _fill_value(a.args[0])
        return -inner if inner is not None else None
    if a.target in (aten.full_like.default, aten.full.default):
        return as_number(a.args[1])
    if a.target is aten.new_full.default:
        return as_number(a.args[2])
    if a.target is aten.scalar_tensor.default:
        return as_number(a.args[0])
    return {aten.ones_like.default: 1.0, aten.zeros_like.default: 0.0, aten.ones.default: 1.0, aten.zeros.default: 0.0,
            aten.new_ones.default: 1.0, aten.new_zeros.default: 0.0}.get(a.target)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return va is not None and vb is not None and tuple(va.shape) == tuple(vb.shape)


def _where_step(cmp: fx.Node, theta: float) -> _Match | None:
    """where(x ≥ θ, 1, −1) or where(x ≥ θ, 1, 0), the branches numbers or tensors filled with them."""
    where = _only_user(cmp)
    if where is None or where.target not in (aten.where.Scalar, aten.where.ScalarSelf, aten.where.ScalarOther,
                                             aten.where.self) or where.args[0] is not cmp:
        return None
    on, off = (_fill_value(a) for a in where.args[1:3])
    if on != 1.0 or off not in (0.0, -1.0) or "val" not in where.meta or where.meta["val"].dtype != torch.float32:
        return None
    if not _same_shape(where, cmp.args[0]):  # filled branches of another shape would broadcast the step
        return None
    extra = [u for u in cmp.users if u.target is aten._assert_tensor_metadata.default]
    return _Match(cmp.args[0], [cmp, *extra, where], TracedSite("", theta, "pm1" if off == -1.0 else "01",
                                                                 COMPARISONS[cmp.target], "exact step in a traced graph"))


def _comparison(cmp: fx.Node, constant: set[fx.Node]) -> _Match | None:
    """(x ≥ θ) or (x > θ) cast to float [·2 − 1], or chosen between 1 and −1 (or 0) by where; θ a number, or
    a constant tensor (a per-unit threshold, often a parameter): then the step is (x − θ) ⋛ 0, which decides
    exactly as x ⋛ θ in IEEE arithmetic (x − θ rounds to 0 only when x = θ, and keeps its sign)."""
    if len(cmp.args) < 2 or not isinstance(cmp.args[0], fx.Node):
        return None
    theta = as_number(cmp.args[1])
    per_unit = theta is None and isinstance(cmp.args[1], fx.Node) and cmp.args[1] in constant
    if theta is None and not per_unit:
        return None
    match = _compared(cmp, 0.0 if per_unit else theta)
    if match is None or not per_unit:
        return match
    with cmp.graph.inserting_before(cmp):
        u = cmp.graph.call_function(aten.sub.Tensor, (cmp.args[0], cmp.args[1]))
    u.meta.update({k: v for k, v in cmp.meta.items() if k != "val"})
    how = f"exact step of x − {cmp.args[1].target} (a per-unit threshold) in a traced graph"
    return replace(match, x=u, site=replace(match.site, how=how))


def _heaviside(node: fx.Node, gm: fx.GraphModule) -> _Match | None:
    """torch.heaviside(x, v): a {0, 1} step at 0 whose value at the tie is v, 1 (ge) or 0 (gt)."""
    values = node.args[1] if len(node.args) > 1 else None
    # torch.tensor(1.) written in forward is a constant copied by lift_fresh_copy (and detached)
    while isinstance(values, fx.Node) and values.target in ALIASES:
        values = values.args[0]
    if isinstance(values, fx.Node) and values.op == "get_attr":
        values = getattr(gm, str(values.target), None)
    tie = {1.0: "ge", 0.0: "gt"}.get(as_number(values))  # type: ignore[arg-type]
    if tie is None or not isinstance(node.args[0], fx.Node):
        return None
    return _Match(node.args[0], [node], TracedSite("", 0.0, "01", tie, "torch.heaviside in a traced graph"))


def _compared(cmp: fx.Node, theta: float) -> _Match | None:
    cast = _only_user(cmp) or _the_cast(cmp)
    if cast is not None and cast.target not in CASTS:
        return _where_step(cmp, theta)
    if cast is None:
        return None
    if cast.target is aten.to.dtype and cast.args[1] != torch.float32:
        return None
    extra = [u for u in cmp.users if u.target is aten._assert_tensor_metadata.default]
    tail = _pm1_tail(cast)
    return _Match(cmp.args[0], [cmp, *extra, cast, *tail], TracedSite("", theta, "pm1" if tail else "01",
                                                                      COMPARISONS[cmp.target],
                                                                      "exact step in a traced graph"))


def _the_cast(cmp: fx.Node) -> fx.Node | None:
    """The one float cast among several readers of a comparison (a concept bottleneck returns its bool concepts
    beside the logits it computes from them); the others then read the step (``_replace``)."""
    casts = [u for u in cmp.users if u.target in CASTS]
    return casts[0] if len(casts) == 1 else None


def _site_path(gm: fx.GraphModule, node: fx.Node, match: _Match, taken: dict[str, TracedSite]) -> str:
    path, kind = scope_of(node)
    base = path if kind in SCOPES and path else (f"{path}.step" if path else "step")
    name, k = base, 1
    while True:
        existing = taken.get(name)
        same = existing is not None and (existing.threshold, existing.levels, existing.tie) == (
            match.site.threshold, match.site.levels, match.site.tie)
        if existing is None and not _is_other_module(gm, name) or same:
            return name
        name, k = f"{base}{k}", k + 1


def _is_other_module(gm: fx.GraphModule, path: str) -> bool:
    try:
        return not isinstance(gm.get_submodule(path), Step)
    except AttributeError:
        return False


def _replace(gm: fx.GraphModule, match: _Match, path: str) -> None:
    out = match.nodes[-1]
    try:
        gm.get_submodule(path)  # the Step of an earlier call of this site
    except AttributeError:
        gm.add_submodule(path, Step(threshold=match.site.threshold, levels=match.site.levels, tie=match.site.tie))
    with gm.graph.inserting_before(match.nodes[0]):  # before every reader of the nodes it replaces
        call = gm.graph.call_module(path, (match.x,))
    call.meta["val"] = out.meta.get("val")
    out.replace_all_uses_with(call)
    for node in match.nodes[:-1]:  # a comparison also read as it is: the step's bool, s > 0 (exact)
        others = [u for u in node.users if u not in match.nodes]
        if others and node.meta.get("val") is not None and node.meta["val"].dtype == torch.bool:
            with gm.graph.inserting_after(call):
                again = gm.graph.call_function(aten.gt.Scalar, (call, 0.0))
            again.meta["val"] = node.meta["val"]
            for user in others:
                user.replace_input_with(node, again)
    for node in reversed(match.nodes):
        gm.graph.erase_node(node)
    _fold_straight_through(gm, call, match.x)




def _skip_aliases(node: fx.Node) -> fx.Node:
    """``node``'s single alias/detach user chain, followed to its end (``(s - x).detach()`` in eval)."""
    while True:
        user = _only_user(node)
        if user is None or user.target not in ALIASES:
            return node
        node = user


def _unaliased(node: Any) -> Any:
    while isinstance(node, fx.Node) and node.target in ALIASES:
        node = node.args[0]
    return node


def _fold_straight_through(gm: fx.GraphModule, call: fx.Node, x: fx.Node) -> None:
    """y + (step(x) − y).detach(), the straight-through estimator written around a step (y = x, or ReActNet's
    approximation of the sign, also written s.detach() − y.detach() + y): in eval it is the step up to the
    rounding of y + (s − y) (which for |y| ≥ 2 is not ±1, and for |y| ≥ 2^24 not even close), so every use of
    the sum becomes a use of the step itself (as the weight form is snapped)."""
    for sub in [u for user in [call, *_alias_chain(call)] for u in user.users]:
        if sub.target is not aten.sub.Tensor or _unaliased(sub.args[0]) is not call or sub.kwargs:
            continue  # a sub or add with alpha is no straight-through estimator
        y = _unaliased(sub.args[1])
        end = _skip_aliases(sub)
        add = _only_user(end)
        if add is None or add.target is not aten.add.Tensor or len(add.args) != 2 or set(add.args) != {y, end} \
                or add.kwargs:
            continue
        add.replace_all_uses_with(call)  # sub, aliases and add are then dead: eliminate_dead_code drops them


def _alias_chain(node: fx.Node) -> list[fx.Node]:
    """The aliases and detaches of ``node`` (``s.detach()``), each used as ``node`` is."""
    found, todo = [], [node]
    while todo:
        for user in todo.pop().users:
            if user.target in ALIASES:
                found.append(user)
                todo.append(user)
    return found


def constant_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from parameters and constants only (a weight binarized in forward is not a step)."""
    const: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and all(
                a in const for a in node.all_input_nodes)):
            const.add(node)
    return const


def export_batched(model: torch.nn.Module, input_shapes: list[list[int]]) -> fx.GraphModule | None:
    """``model`` traced by torch.export with a free batch dimension, as a graph module; None when it
    cannot be traced (the caller then works without the program)."""
    examples = tuple(torch.zeros(2, *shape) for shape in input_shapes)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(model, examples, dynamic_shapes=tuple({0: batch} for _ in examples))
    except RuntimeError:
        return None
    return program.module()


def _sign(node: fx.Node, tie: str) -> _Match | None:
    """torch.sign(x) read as a ±1 step at 0 (``sign_as_step``): it declares no value at 0 that a step can keep
    (it gives 0 there), so the tie rule given decides it, ``ge`` (+1, as larq and LCE) unless ``--tie gt``."""
    if not isinstance(node.args[0], fx.Node):
        return None
    return _Match(node.args[0], [node], TracedSite("", 0.0, "pm1", tie, "torch.sign read as a step (--sign-as-step)"))


def harden_graph_module(gm: fx.GraphModule, tie: str | None, sign_as_step: bool = False
                        ) -> tuple[fx.GraphModule, list[TracedSite]]:
    """A copy of a torch.export graph module with every site a ``Step`` call, and the sites found; with
    ``sign_as_step``, every ``torch.sign`` of a computed tensor is a site too."""
    hard = copy.deepcopy(gm)
    sites: dict[str, TracedSite] = {}
    found: list[TracedSite] = []
    constant = constant_nodes(hard.graph)
    for node in list(hard.graph.nodes):
        if node.graph is None or node.op != "call_function" or node in constant:
            continue
        match = None
        if node.target is aten.sigmoid.default:
            match = _composite(node, tie or "ge")
        elif node.target is aten.sign.default and sign_as_step:
            match = _sign(node, tie or "ge")
        elif node.target in COMPARISONS or node.target is aten.heaviside.default:
            match = _comparison(node, constant) if node.target in COMPARISONS else _heaviside(node, hard)
            if match is not None and tie is not None and match.site.tie != tie:
                raise BadInput(f"site {_site_path(hard, node, match, sites)!r} of the program steps with tie "
                               f"{match.site.tie!r}; --tie {tie} "
                               f"conflicts with it (drop --tie)")
        if match is None:
            continue
        path = _site_path(hard, node, match, sites)
        _replace(hard, match, path)
        site = replace(match.site, path=path)
        if path not in sites:
            found.append(site)
        sites[path] = site
    hard.graph.eliminate_dead_code()
    hard.graph.lint()
    hard.recompile()
    return hard, found


__all__ = ["TracedSite", "harden_graph_module", "export_batched"]
