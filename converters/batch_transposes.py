"""The transposes that move the batch of a time-first model (``htaf_export.batch_axis``: the model's
``[T, N, F]`` fed batch-first), dissolved where they meet the loop over time: a Keras graph keeps the batch
first throughout, so a TFLite target cannot move it, but needs not.

- ``Transpose(x)`` read only by Gathers of one constant index (``x[t]`` for each time step), or by Slices of
  one index squeezed (``for x_t in x``), is each of them on the axis the transpose took it from (``x[:, t]``);
- ``Transpose(Concat(Unsqueeze(s₀), Unsqueeze(s₁), …))`` (``torch.stack(steps)`` moved batch-first) is the
  same stack on the axis the transpose put it at (``torch.stack(steps, dim=1)``).

A reader may need what is left of the permutation after it (a transpose that keeps the batch first); a
transpose left is refused by the builder, as before."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from htaf_export.passes.util import attr, const_array, new_initializer


def _perm(node: ir.Node) -> list[int]:
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 0
    return [int(p) for p in attr(node, "perm", list(range(rank - 1, -1, -1)))]


def _kept_order(perm: list[int], axis: int) -> bool:
    rest = [p for i, p in enumerate(perm) if i != axis]
    return rest == sorted(rest)


def _axis(node: ir.Node, rank: int) -> int:
    axis = int(attr(node, "axis", 0))
    return axis + rank if axis < 0 else axis


def read_axis(use: ir.Node, rank: int) -> int | None:
    """The axis a reader takes one index of: a Gather of one constant index, or a Slice of one axis (step 1) read
    only by a Squeeze of that axis (``for x_t in x``); None for any other reader."""
    if use.op_type == "Gather" and len(use.inputs) > 1:
        index = const_array(use.inputs[1])
        return _axis(use, rank) if index is not None and index.ndim == 0 else None
    if use.op_type != "Slice" or len(use.inputs) < 4:
        return None
    axes, steps = const_array(use.inputs[3]), const_array(use.inputs[4]) if len(use.inputs) > 4 else None
    readers = [u.node for u in use.outputs[0].uses()]
    if axes is None or axes.size != 1 or (steps is not None and np.any(steps != 1)) or len(readers) != 1 or \
            readers[0].op_type != "Squeeze" or len(readers[0].inputs) < 2:
        return None
    squeezed = const_array(readers[0].inputs[1])
    axis = int(axes.reshape(-1)[0]) % rank
    return axis if squeezed is not None and squeezed.size == 1 and int(squeezed.reshape(-1)[0]) % rank == axis \
        else None


def _residual(perm: list[int], axis: int) -> list[int] | None:
    """After taking index ``axis`` of ``x.permute(perm)`` as index ``perm[axis]`` of ``x``, the permutation of what
    is left that gives the same tensor (None where it would move the batch: it stays first)."""
    kept = [i for i in range(len(perm)) if i != perm[axis]]
    wanted = [perm[i] for i in range(len(perm)) if i != axis]
    order = [kept.index(p) for p in wanted]
    return order if order and order[0] == 0 else None


def _into_readers(graph: ir.Graph, node: ir.Node, perm: list[int]) -> bool:
    """Each reader taking one index of the transposed tensor takes it of the input instead, followed by what is
    left of the permutation, when that keeps the batch first (timm's ``qkv.permute(2, 0, 3, 1, 4)`` then
    ``q, k, v = qkv``: a transpose of each part that the builder takes)."""
    uses = [u.node for u in node.outputs[0].uses()]
    if not uses or node.outputs[0].is_graph_output():
        return False
    rank = len(perm)
    axes = [read_axis(use, rank) for use in uses]
    if any(a is None or use.inputs[0] is not node.outputs[0] or _residual(perm, a) is None or
           (_residual(perm, a) != sorted(_residual(perm, a)) and _final(use).outputs[0].is_graph_output())  # type: ignore[type-var,arg-type]
           for use, a in zip(uses, axes)):
        return False
    moved: dict[int, ir.Value] = {}
    for use, a in zip(uses, axes):
        source = perm[a]  # type: ignore[index]
        last = use
        if use.op_type == "Gather":
            use.attributes["axis"] = ir.AttrInt64("axis", source)
        else:
            if source not in moved:
                moved[source] = new_initializer(graph, f"{node.name or 'transpose'}.axis{source}", np.array([source], np.int64))
            use.replace_input_with(3, moved[source])
            use.outputs[0].shape = None  # its size-1 axis now lies elsewhere: unknown, not stale
            last = _final(use)
            last.replace_input_with(1, moved[source])
        use.replace_input_with(0, node.inputs[0])
        order = _residual(perm, a)  # type: ignore[arg-type]
        if order != sorted(order):  # type: ignore[type-var]
            _transpose_after(graph, last, order)  # type: ignore[arg-type]
    graph.remove(node, safe=True)
    return True


def _final(reader: ir.Node) -> ir.Node:
    """The node whose output holds the index taken: the Gather, or the Squeeze after a Slice."""
    return reader if reader.op_type == "Gather" else next(iter(reader.outputs[0].uses())).node


def _transpose_after(graph: ir.Graph, node: ir.Node, order: list[int]) -> None:
    out = node.outputs[0]
    readers = list(out.uses())  # before the transpose reads it too
    transpose = ir.node("Transpose", [out], {"perm": order}, name=f"{node.name or 'part'}/reordered")
    graph.insert_after(node, transpose)
    transpose.outputs[0].name = f"{out.name}.reordered"
    transpose.outputs[0].shape = out.shape = None
    for use in readers:
        use.node.replace_input_with(use.idx, transpose.outputs[0])


def _stacked(node: ir.Node) -> tuple[ir.Node, list[ir.Node], int] | None:
    concat = node.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or len(node.inputs[0].uses()) != 1:
        return None
    axis = int(attr(concat, "axis", 0))
    parts = [v.producer() for v in concat.inputs]
    for part in parts:
        axes = const_array(part.inputs[1]) if part is not None and part.op_type == "Unsqueeze" else None
        if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) != axis or len(part.outputs[0].uses()) != 1:
            return None
    return concat, parts, axis


def _into_stack(graph: ir.Graph, node: ir.Node, perm: list[int]) -> bool:
    found = _stacked(node)
    if found is None:
        return False
    concat, parts, axis = found
    if axis < 0 or axis not in perm or not _kept_order(perm, perm.index(axis)):
        return False
    moved = perm.index(axis)
    where = new_initializer(graph, f"{concat.name or 'stack'}.axis", np.array([moved], np.int64))
    for part in parts:
        part.replace_input_with(1, where)
        part.outputs[0].shape = None  # the new axis lies elsewhere now: unknown, not stale
    concat.attributes["axis"] = ir.AttrInt64("axis", moved)
    out = node.outputs[0]
    result = concat.outputs[0]
    _bypass(graph, node, result)
    result.shape = out.shape
    return True


def _swap_front(axes: np.ndarray, rank: int) -> list[int]:
    swap = [1, 0, *range(2, rank)]
    return [swap[int(a) % rank] for a in np.reshape(axes, -1)]


def _reads_across_steps(reader: ir.Node, rank: int) -> bool:
    """A reader of a stack that gives the same tensor whether the stacked axis is first or second: a Transpose
    (composed with the swap), one step picked (a Gather of one index on the stacked axis), or a reduction that
    drops the stacked axis and not the batch (the axes left keep their order either way)."""
    if reader.op_type == "Transpose":
        return len(_perm(reader)) == rank
    if reader.op_type == "Gather":
        index = const_array(reader.inputs[1])
        return index is not None and index.ndim == 0 and _axis(reader, rank) == 0
    if reader.op_type in ("ReduceMean", "ReduceSum") and len(reader.inputs) > 1 and int(attr(reader, "keepdims", 1)) == 0:
        axes = const_array(reader.inputs[1])
        reduced = {int(a) % rank for a in np.reshape(axes, -1)} if axes is not None else set()
        return 0 in reduced and 1 not in reduced
    return False


def _stack_behind_batch(graph: ir.Graph, concat: ir.Node) -> bool:
    """``torch.stack(steps)`` of batch-first steps puts the new axis before the batch; stacked on axis 1 instead,
    each reader sees the first two axes swapped: a Transpose composes with the swap (the identity: dropped), a
    Gather of one step or a reduction over the steps reads axis 1 (``_reads_across_steps``). Any other reader:
    the stack is left as it was."""
    if concat.op_type != "Concat" or int(attr(concat, "axis", 0)) != 0 or concat.outputs[0].is_graph_output():
        return False
    parts = [v.producer() for v in concat.inputs]
    if any(p is None or p.op_type != "Unsqueeze" or const_array(p.inputs[1]) is None or
           [int(a) for a in np.reshape(const_array(p.inputs[1]), -1)] != [0] or len(p.outputs[0].uses()) != 1
           for p in parts):
        return False
    rank = len(concat.outputs[0].shape) if concat.outputs[0].shape is not None else 0
    readers = [u.node for u in concat.outputs[0].uses()]
    if rank < 2 or not all(_reads_across_steps(r, rank) for r in readers):
        return False
    one = new_initializer(graph, f"{concat.name or 'stack'}.behind_batch", np.array([1], np.int64))
    for p in parts:
        p.replace_input_with(1, one)
        p.outputs[0].shape = None
    concat.attributes["axis"] = ir.AttrInt64("axis", 1)
    dims = list(concat.outputs[0].shape)
    concat.outputs[0].shape = ir.Shape([dims[1], dims[0], *dims[2:]])
    for r in readers:
        if r.op_type == "Transpose":
            perm = [[1, 0, *range(2, rank)][q] for q in _perm(r)]
            if perm == list(range(rank)):
                _bypass(graph, r, concat.outputs[0])
            else:
                r.attributes["perm"] = ir.AttrInt64s("perm", perm)
        elif r.op_type == "Gather":
            r.attributes["axis"] = ir.AttrInt64("axis", _swap_front(np.array([_axis(r, rank)]), rank)[0])
        else:
            axes = _swap_front(const_array(r.inputs[1]), rank)
            r.replace_input_with(1, new_initializer(graph, f"{r.name}.axes", np.array(axes, np.int64)))
    return True


def _bypass(graph: ir.Graph, node: ir.Node, result: ir.Value) -> None:
    """``node`` removed, its readers (and the graph, under its output's name) reading ``result`` instead."""
    out = node.outputs[0]
    name, was_output = out.name, out.is_graph_output()
    if was_output:
        graph.outputs[list(graph.outputs).index(out)] = result
    ir.convenience.replace_all_uses_with(out, result)
    graph.remove(node, safe=True)
    if was_output:
        result.name = name


def dissolve_batch_transposes(model: ir.Model) -> int:
    """Dissolve every transpose that moves the batch where it meets a time loop; → how many."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "":
            continue
        perm = _perm(node)
        if not perm or perm[0] == 0:
            continue
        if _into_readers(graph, node, perm) or _into_stack(graph, node, perm):
            count += 1
    for node in list(graph):
        if node.domain == "" and _stack_behind_batch(graph, node):
            count += 1
    return count


__all__ = ["dissolve_batch_transposes", "read_axis"]
