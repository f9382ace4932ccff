"""Models that carry the batch on another axis than the first: a spiking network fed ``[T, N, F]`` and
returning ``[T, N, C]``, as snnTorch's tutorials write them. Every stage, runtime and data file of
htaf-export reads the batch on axis 0, so such a model is made batch-first where it is read: its inputs
have their batch moved in place on the way in and its outputs have it moved to the front on the way out
(permutes inside a ``.pt2`` program's graph, forward hooks on a module). The artifact is then batch-first,
and the export says so in a note.

Where the batch lies: a ``.pt2`` program says it (the one dynamic dimension of each input and output). A
module does not, so it is probed: an output's batch axis is the one that follows the number of samples; when
new values for one sample on axis 0 change the others' results, axis 0 of the inputs is not a batch, and the
second axis is tried, taken when its samples do not affect each other."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import outputs

aten = torch.ops.aten


@dataclass(frozen=True)
class BatchAxes:
    """The axis of the batch in each input and each flat output of a model."""

    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    @property
    def batch_first(self) -> bool:
        return not any(self.inputs) and not any(self.outputs)

    def note(self, inputs: Sequence[str], shapes: Sequence[Sequence[int]], outputs: Sequence[str],
             subject: str = "the artifact") -> str:
        said = [f"input {name!r} is [N, {', '.join(map(str, shape))}], the model's "
                f"[{', '.join(map(str, _with_batch(shape, axis)))}] (feed np.moveaxis(x, {axis}, 0))"
                for name, axis, shape in zip(inputs, self.inputs, shapes) if axis]
        for axis in sorted({a for a in self.outputs if a}):
            names = [repr(name) for name, a in zip(outputs, self.outputs) if a == axis]
            said.append(f"output{'s' if len(names) > 1 else ''} {', '.join(names)} {'have' if len(names) > 1 else 'has'} "
                        f"the batch first, the model's on axis {axis} (np.moveaxis(y, 0, {axis}) gives the model's layout)")
        return f"{subject} is batch first: " + "; ".join(said)


def _with_batch(shape: Sequence[int], axis: int) -> list[Any]:
    dims: list[Any] = list(shape)
    dims.insert(axis, "N")
    return dims


def program_axes(program: Any) -> BatchAxes | None:
    """The batch axes a ``.pt2`` program declares (its one dynamic dimension per input, the same symbol in
    its outputs); None when it declares no single such axis."""
    user = set(program.graph_signature.user_inputs)
    shapes = [n.meta["val"].shape for n in program.graph.nodes
              if n.op == "placeholder" and n.name in user and "val" in n.meta]
    dynamic = [[i for i, d in enumerate(s) if not isinstance(d, int)] for s in shapes]
    if not shapes or any(len(d) != 1 for d in dynamic):
        return None
    symbol = str(shapes[0][dynamic[0][0]])
    output = next(n for n in program.graph.nodes if n.op == "output")
    found = []
    for leaf in pytree.tree_leaves(output.args[0]):
        dims = [str(d) for d in leaf.meta["val"].shape] if isinstance(leaf, fx.Node) and "val" in leaf.meta else []
        if symbol not in dims:
            return None
        found.append(dims.index(symbol))
    return BatchAxes(tuple(d[0] for d in dynamic), tuple(found))


def made_batch_first(program: Any, module: fx.GraphModule) -> tuple[BatchAxes | None, list[list[int]]]:
    """(the axes, each input's per-sample shape) of a ``.pt2`` program whose batch is not first, its module
    made batch-first (``move_in_graph``); (None, []) for a batch-first program, left as it is."""
    axes = program_axes(program)
    if axes is None or axes.batch_first:
        return None, []
    full = [list(n.meta["val"].shape) for n in program.graph.nodes
            if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    move_in_graph(module, axes, [len(f) for f in full])
    return axes, [[int(d) for i, d in enumerate(f) if i != a] for f, a in zip(full, axes.inputs)]


def _perm(rank: int, source: int, destination: int) -> list[int]:
    order = list(range(rank))
    order.insert(destination, order.pop(source))
    return order


def move_in_graph(module: fx.GraphModule, axes: BatchAxes, ranks_in: Sequence[int]) -> None:
    """A ``.pt2`` program's module made batch-first: a permute after each input and before each output, and
    its shape guard dropped (it checks the shapes of the old layout)."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, axis, rank in zip(placeholders, axes.inputs, ranks_in):
        if axis:
            with graph.inserting_after(node):
                moved = graph.call_function(aten.permute.default, (node, _perm(rank, 0, axis)))
            node.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)
    output = next(n for n in graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(output.args[0])
    moved_out = []
    for leaf, axis in zip(leaves, axes.outputs):
        if axis and isinstance(leaf, fx.Node):
            with graph.inserting_before(output):
                leaf = graph.call_function(aten.movedim.int, (leaf, axis, 0))
        moved_out.append(leaf)
    output.args = (pytree.tree_unflatten(moved_out, spec),)
    module.recompile()
    setattr(module, MARK, axes)


def _inputs_moved(axes: tuple[int, ...], module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.movedim(0, axis) if axis and isinstance(a, torch.Tensor) else a for a, axis in zip(args, axes))


def _outputs_moved(axes: tuple[int, ...], module: nn.Module, args: Any, out: Any) -> Any:
    flat, spec = pytree.tree_flatten(out)
    return pytree.tree_unflatten([t.movedim(axis, 0) if axis else t for t, axis in zip(flat, axes)], spec)


MARK = "_htaf_batch_axes"  # on a module made batch-first here: its axes, so that it is not probed or moved twice


def moved_axes(module: nn.Module) -> BatchAxes | None:
    """The axes a module was made batch-first with (``move_with_hooks``, ``move_in_graph``), else None."""
    return getattr(module, MARK, None)


def move_with_hooks(module: nn.Module, axes: BatchAxes) -> None:
    """A module made batch-first by forward hooks (module-level functions: the module still pickles), marked."""
    if moved_axes(module) is not None:
        return
    module.register_forward_pre_hook(functools.partial(_inputs_moved, axes.inputs))
    module.register_forward_hook(functools.partial(_outputs_moved, axes.outputs))
    setattr(module, MARK, axes)


Summary = tuple  # (shape, per-sample checksums of the samples after the first along its batch axis, or None)


def _summary(t: torch.Tensor, d: int | None) -> Summary:
    """A tensor as its shape and, along batch axis ``d``, two float64 checksums of each sample after the first:
    equal tensors give equal sums, and a change leaves both equal only by a coincidence of cancellations. A
    probe keeps these, not every submodule's activations."""
    if d is None or t.dim() == 0 or not t.is_floating_point() and t.dtype != torch.bool:
        return tuple(t.shape), None
    rest = t.narrow(d, 1, t.shape[d] - 1).movedim(d, 0).reshape(t.shape[d] - 1, -1).double()
    weights = torch.linspace(1.0, 2.0, rest.shape[1], dtype=torch.float64)
    return tuple(t.shape), torch.stack([rest.sum(1), rest @ weights])


def _recorded(module: nn.Module, xs: Sequence[torch.Tensor], axes: list[int | None] | None = None,
              shapes_fewer: list[tuple] | None = None, n: int = 0) -> tuple[list[torch.Tensor], list[Summary]]:
    """(the flat outputs, a summary of every tensor each submodule returned, in call order) for ``xs``: its shape
    alone, or with ``shapes_fewer`` (the same call's shapes for two samples) its checksums along the axis that
    follows the number of samples ``n``."""
    seen: list[Summary] = []

    def keep(_m, _a, out) -> None:
        for t in (t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)):
            k = len(seen)
            fewer = shapes_fewer[k] if shapes_fewer is not None and k < len(shapes_fewer) else None
            d = _following_shape(tuple(t.shape), fewer, n) if fewer is not None else None
            seen.append(_summary(t, d) if fewer is not None else (tuple(t.shape), None))

    handles = [m.register_forward_hook(keep) for m in module.modules() if m is not module]
    try:
        with torch.no_grad():
            return outputs.leaves(module(*xs)), seen
    finally:
        for h in handles:
            h.remove()


def _following_shape(shape: tuple, fewer: tuple, n: int) -> int | None:
    """The axis of ``shape`` that follows the number of samples (``n``, then two), if exactly one does."""
    follows = [d for d in range(len(shape)) if len(fewer) == len(shape) and shape[d] != fewer[d]]
    return follows[0] if len(follows) == 1 and shape[follows[0]] == n else None


def _independent(module: nn.Module, xs: list[torch.Tensor], axes: Sequence[int]) -> tuple[int, ...] | None:
    """The batch axis of each flat output when the samples on ``axes`` (one per input) of ``xs`` do not affect
    each other, else None. New values for sample 0 must leave every other sample's values as they were: in the outputs,
    and in what each submodule returns (a step's output alone may not show the change, as a spiking layer
    that stays silent on random inputs)."""
    n = xs[0].shape[axes[0]]
    changed = [x.clone() for x in xs]
    for x, axis in zip(changed, axes):
        x.select(axis, 0).mul_(-4).add_(1)
    fewer, inner_fewer = _recorded(module, [x.narrow(axis, 0, 2) for x, axis in zip(xs, axes)])
    shapes_fewer = [shape for shape, _ in inner_fewer]
    ys, inner = _recorded(module, xs, shapes_fewer=shapes_fewer, n=n)
    moved, inner_moved = _recorded(module, changed, shapes_fewer=shapes_fewer, n=n)
    found = []
    for y, m, f in zip(ys, moved, fewer):
        d = _following_shape(tuple(y.shape), tuple(f.shape), n)
        if d is None or y.shape != m.shape or not torch.equal(y.narrow(d, 1, n - 1), m.narrow(d, 1, n - 1)):
            return None
        found.append(d)
    if len(inner) != len(inner_moved) or len(inner) != len(inner_fewer):
        return None  # a different path for other values: the samples decide together
    if any(a[0] != b[0] or (a[1] is not None and not torch.equal(a[1], b[1])) for a, b in zip(inner, inner_moved)):
        return None
    return tuple(found)


def probe_axes(module: nn.Module, shapes: Sequence[Sequence[int]]) -> BatchAxes | None:
    """The batch axes of a module: its outputs' when its inputs are batch first but an output is not; for a
    module whose samples on axis 0 are not independent, axis 1 of every input, or else of some inputs (a
    time-first sequence beside a batch-first context), when its samples are independent so (and where each
    output carries it); else None (left as it is: batch first, or beyond this probe, for the usual checks to
    report)."""
    first = _probed(module, shapes, (0,) * len(shapes))
    if first is not None:  # batch first in, perhaps not out ([T, N, C] stacked spikes)
        return BatchAxes(tuple(0 for _ in shapes), first) if any(first) else None
    for axes in _layouts([len(s) >= 1 for s in shapes]):
        found = _probed(module, shapes, axes)
        if found is not None:
            return BatchAxes(axes, found)
    return None


def _layouts(can_move: Sequence[bool]) -> list[tuple[int, ...]]:
    """Batch axes to try, all inputs time first before any mix (at most 4 inputs are mixed: 15 layouts)."""
    movable = [i for i, ok in enumerate(can_move) if ok]
    if not movable:
        return []
    every = tuple(1 if ok else 0 for ok in can_move)
    mixed = [] if len(movable) > 4 else [tuple(1 if i in chosen else 0 for i in range(len(can_move)))
                                         for r in range(len(movable) - 1, 0, -1)
                                         for chosen in itertools.combinations(movable, r)]
    return [every, *mixed]


def _probed(module: nn.Module, shapes: Sequence[Sequence[int]], axes: tuple[int, ...]) -> tuple[int, ...] | None:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(*s[:a], 3, *s[a:], generator=gen) for s, a in zip(shapes, axes)]
    try:
        return _independent(module, xs, axes)
    except Exception:  # noqa: BLE001 - a probe that does not run says nothing; the usual checks report
        return None
