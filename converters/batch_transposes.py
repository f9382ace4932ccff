"""The transposes that move the batch of a time-first model (``htaf_export.batch_axis``: the model's
``[T, N, F]`` fed batch-first), dissolved where they meet the loop over time: a Keras graph keeps the batch
first throughout, so a TFLite target cannot move it, but needs not.

- ``Transpose(x)`` read only by Gathers of one constant index (``x[t]`` for each time step) is each Gather
  on the axis the transpose took it from (``x[:, t]``);
- ``Transpose(Concat(Unsqueeze(s₀), Unsqueeze(s₁), …))`` (``torch.stack(steps)`` moved batch-first) is the
  same stack on the axis the transpose put it at (``torch.stack(steps, dim=1)``).

Either holds only where the other axes keep their order; a transpose left is refused by the builder, as
before."""

from __future__ import annotations

import onnx_ir as ir

from htaf_export.passes.util import attr, const_array


def _perm(node: ir.Node) -> list[int]:
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 0
    return [int(p) for p in attr(node, "perm", list(range(rank - 1, -1, -1)))]


def _kept_order(perm: list[int], axis: int) -> bool:
    rest = [p for i, p in enumerate(perm) if i != axis]
    return rest == sorted(rest)


def _axis(node: ir.Node, rank: int) -> int:
    axis = int(attr(node, "axis", 0))
    return axis + rank if axis < 0 else axis


def _into_gathers(graph: ir.Graph, node: ir.Node, perm: list[int]) -> bool:
    uses = [u.node for u in node.outputs[0].uses()]
    if not uses or node.outputs[0].is_graph_output():
        return False
    rank = len(perm)
    for use in uses:
        index = const_array(use.inputs[1]) if use.op_type == "Gather" and len(use.inputs) > 1 else None
        if index is None or index.ndim != 0 or use.inputs[0] is not node.outputs[0] or \
                not _kept_order(perm, _axis(use, rank)):
            return False
    for use in uses:
        use.attributes["axis"] = ir.AttrInt64("axis", perm[_axis(use, rank)])
        use.replace_input_with(0, node.inputs[0])
    graph.remove(node, safe=True)
    return True


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
    where = ir.Value(name=f"{concat.name or 'stack'}.axis",
                     const_value=ir.tensor([moved], dtype=ir.DataType.INT64, name=f"{concat.name or 'stack'}.axis"))
    graph.register_initializer(where)
    for part in parts:
        part.replace_input_with(1, where)
    concat.attributes["axis"] = ir.AttrInt64("axis", moved)
    out = node.outputs[0]
    result = concat.outputs[0]
    if out.is_graph_output():
        index = list(graph.outputs).index(out)
        name = out.name
        graph.outputs[index] = result
        ir.convenience.replace_all_uses_with(out, result)
        graph.remove(node, safe=True)
        result.name = name
    else:
        ir.convenience.replace_all_uses_with(out, result)
        graph.remove(node, safe=True)
    result.shape = out.shape
    return True


def dissolve_batch_transposes(model: ir.Model) -> int:
    """Dissolve every transpose that moves the batch where it meets a time loop; → how many."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "":
            continue
        perm = _perm(node)
        if not perm or perm[0] == 0:
            continue
        if _into_gathers(graph, node, perm) or _into_stack(graph, node, perm):
            count += 1
    return count


__all__ = ["dissolve_batch_transposes"]
