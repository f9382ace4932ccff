"""1-D feature maps [N, C, L] as 2-D ones [N, C, 1, L], for the TFLite targets, whose convolutions and pools are 2-D.

A Conv1d, MaxPool1d or AvgPool1d becomes its height-1 2-D form, and the batch norms, steps and elementwise ops
that follow it stay on [N, C, 1, L] (so a binary Conv1d bit-packs as a Conv2d does, and a batch norm still folds
into the next step's threshold), until an op without such a form reads the map: that op gets the [N, C, L] tensor
back through a Squeeze. Values keep their names (the report's step tensors); the graph's ``meta[LIFTED]`` names
the lifted values (by name: later passes rebuild the nodes that hold them), whose PyTorch shape drops the unit axis.
Ranks come from the ops, not from shape inference (a TorchScript capture leaves values unshaped): a 1-D window reads
[N, C, L] by definition.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from htaf_export.ops import HTAF_DOMAIN
from htaf_export.passes.util import attr, const_array, new_initializer

LIFTED = "htaf.lifted_1d"

WINDOWED = ("Conv", "MaxPool", "AveragePool")
# Ops that compute the same on [N, C, 1, L] as on [N, C, L] once their constants get the unit axis too.
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt",
               "Sign", "Clip", "LeakyRelu", "PRelu", "Identity", "Where", "BatchNormalization")
POOLED = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


def lift_one_dimensional(model: ir.Model) -> int:
    """Lift ``model``'s 1-D maps in place (module docstring); → how many 1-D convolutions and pools became 2-D."""
    return _Lift(model.graph).run()


class _Lift:
    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.lifted: set[int] = set()  # ids of values that now hold [N, C, 1, L]
        self._unsqueezed: dict[int, ir.Value] = {}
        self._squeezed: dict[int, ir.Value] = {}
        self._axis: ir.Value | None = None

    def run(self) -> int:
        count = 0
        for node in list(self.graph):
            if node.domain == "" and node.op_type == "Unsqueeze" and self._unsqueezes_height(node):
                self._already_lifted(node)
            elif self._lifts(node):
                count += node.op_type in WINDOWED
                self._lift(node)
            else:
                for i, value in enumerate(node.inputs):
                    if value is not None and id(value) in self.lifted:
                        node.replace_input_with(i, self._squeeze(value, node))
        for i, value in enumerate(self.graph.outputs):
            if id(value) in self.lifted:
                raise AssertionError(f"lifted graph output {value.name}")  # _lifts never lifts one
        return count

    # ---- which nodes lift --------------------------------------------------------------------

    def _unsqueezes_height(self, node: ir.Node) -> bool:
        """Unsqueeze(axis 2) of a lifted map: what PyTorch writes around a 2-D op (adaptive_avg_pool1d)."""
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        return (id(node.inputs[0]) in self.lifted and axes is not None and axes.size == 1
                and int(axes.reshape(-1)[0]) in (2, -2) and not node.outputs[0].is_graph_output())

    def _lifts(self, node: ir.Node) -> bool:
        if len(node.outputs) != 1:
            return False
        if node.domain == "" and node.op_type in WINDOWED:
            return _one_d_window(node)
        if node.domain == "" and node.op_type == "Pad":  # an even kernel's 'same' padding, before its conv
            return _one_d_pads(node) and (id(node.inputs[0]) in self.lifted or all(
                use.op_type in WINDOWED and _one_d_window(use) for use, _ in node.outputs[0].uses()))
        if node.outputs[0].is_graph_output():
            return False  # a step or a head the report names: it keeps its value
        maps = [v for v in node.inputs if v is not None and v.const_value is None]
        if not maps or not all(id(v) in self.lifted or _rank(v) == 3 for v in maps):
            return False
        if node.domain == HTAF_DOMAIN:
            return node.op_type in ("Sign", "Heaviside") and id(node.inputs[0]) in self.lifted
        if node.domain != "":
            return False
        if not any(id(v) in self.lifted for v in maps):
            return False  # only maps downstream of a lifted conv or pool lift
        if node.op_type in ELEMENTWISE:
            return all(const_array(v) is None or const_array(v).ndim <= 3 for v in node.inputs if v is not None)
        if node.op_type in ("ReduceMean", "ReduceMax"):
            axes = _reduce_axes(node)
            return axes is not None and sorted(a % 3 for a in axes) == [2]
        if node.op_type == "Flatten":
            return int(attr(node, "axis", 1)) == 1
        return node.op_type in POOLED

    def _already_lifted(self, node: ir.Node) -> None:
        """The map is [N, C, 1, L] already: an Identity, whose readers were written for 4-D and stay as they are."""
        same = ir.node("Identity", [node.inputs[0]], name=node.name)
        name, node.outputs[0].name = node.outputs[0].name, f"{node.outputs[0].name}.unsqueezed"
        same.outputs[0].name, same.outputs[0].dtype = name, node.outputs[0].dtype
        same.outputs[0].shape = node.outputs[0].shape
        self.graph.insert_before(node, same)
        ir.convenience.replace_all_uses_with(node.outputs[0], same.outputs[0])
        self.graph.remove(node, safe=True)

    # ---- lifting -----------------------------------------------------------------------------

    def _lift(self, node: ir.Node) -> None:
        for i, value in enumerate(node.inputs):
            if value is None:
                continue
            if value.const_value is None:
                if id(value) not in self.lifted:
                    node.replace_input_with(i, self._unsqueeze(value, node))
            elif node.op_type in ELEMENTWISE + ("Sign", "Heaviside") and not (
                    node.op_type == "BatchNormalization" and i > 0):
                node.replace_input_with(i, self._constant(value, _with_height(const_array(value))))
        if node.op_type == "Conv":
            weight = const_array(node.inputs[1])
            node.replace_input_with(1, self._constant(node.inputs[1], weight[:, :, None, :]))
        if node.op_type in WINDOWED:
            _two_d_window(node)
        if node.op_type == "Pad":
            begin, end = np.split(const_array(node.inputs[1]).astype(np.int64), 2)
            pads = np.concatenate([begin[:2], [0], begin[2:], end[:2], [0], end[2:]])
            node.replace_input_with(1, new_initializer(self.graph, f"{node.name}.pads_2d", pads))
        if node.op_type in ("ReduceMean", "ReduceMax"):
            _reduce_over_map(self.graph, node)
        out = node.outputs[0]
        if node.op_type == "Flatten" or (node.op_type in ("ReduceMean", "ReduceMax") and not attr(node, "keepdims", 1)):
            return  # the same [N, F] as before
        if out.is_graph_output():
            self._output_stays_1d(node)
        self.graph.meta.setdefault(LIFTED, set()).add(out.name)
        out.shape = _with_unit_axis(out.shape)
        self.lifted.add(id(out))

    def _output_stays_1d(self, node: ir.Node) -> None:
        """A graph output a 1-D conv or pool makes (a per-frame head): the lifted map, squeezed back under its name."""
        out = node.outputs[0]
        back = ir.node("Squeeze", [out, self._height_axis()], name=f"{out.name}/to_1d")
        back.outputs[0].dtype, back.outputs[0].shape = out.dtype, out.shape
        name, out.name = out.name, f"{out.name}.2d"
        back.outputs[0].name = name
        self.graph.insert_after(node, back)
        self.graph.outputs[self.graph.outputs.index(out)] = back.outputs[0]

    def _constant(self, value: ir.Value, array: np.ndarray) -> ir.Value:
        """``value`` holding ``array`` (reshaped in place, keeping the parameter's name, when nothing else reads it)."""
        if array.shape == const_array(value).shape:
            return value
        array = np.ascontiguousarray(array)
        if len(value.uses()) == 1 and not value.is_graph_output() and value.name in self.graph.initializers:
            value.const_value, value.shape = ir.tensor(array, name=value.name), ir.Shape(array.shape)
            return value
        return new_initializer(self.graph, f"{value.name}.2d", array)

    def _height_axis(self) -> ir.Value:
        if self._axis is None:
            self._axis = new_initializer(self.graph, "htaf.lift_1d.axis", np.array([2], np.int64))
        return self._axis

    def _unsqueeze(self, value: ir.Value, before: ir.Node) -> ir.Value:
        if id(value) not in self._unsqueezed:
            node = ir.node("Unsqueeze", [value, self._height_axis()], name=f"{value.name}/to_2d")
            node.outputs[0].name, node.outputs[0].dtype = f"{value.name}.2d", value.dtype
            node.outputs[0].shape = _with_unit_axis(value.shape)
            self.graph.insert_before(before, node)
            self._unsqueezed[id(value)] = node.outputs[0]
            self.lifted.add(id(node.outputs[0]))
        return self._unsqueezed[id(value)]

    def _squeeze(self, value: ir.Value, before: ir.Node) -> ir.Value:
        if id(value) not in self._squeezed:
            node = ir.node("Squeeze", [value, self._height_axis()], name=f"{value.name}/to_1d")
            node.outputs[0].name, node.outputs[0].dtype = f"{value.name}.1d", value.dtype
            node.outputs[0].shape = None if value.shape is None else ir.Shape([value.shape[i] for i in (0, 1, 3)])
            self.graph.insert_before(before, node)
            self._squeezed[id(value)] = node.outputs[0]
        return self._squeezed[id(value)]


def _rank(value: ir.Value) -> int | None:
    return value.shape.rank() if value.shape is not None else None


def _one_d_window(node: ir.Node) -> bool:
    if node.op_type == "Conv":  # a weight computed at run time is refused by the converter as it is
        weight = const_array(node.inputs[1])
        one_d = weight is not None and weight.ndim == 3
    else:
        one_d = len(attr(node, "kernel_shape", [])) == 1
    return one_d and attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")


def _one_d_pads(node: ir.Node) -> bool:
    """A constant-mode Pad of [N, C, L] with constant pads over all three axes."""
    pads = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    axes_given = len(node.inputs) > 3 and node.inputs[3] is not None
    return (attr(node, "mode", "constant") == "constant" and pads is not None and pads.size == 6
            and not axes_given)


def _with_unit_axis(shape: ir.Shape | None) -> ir.Shape | None:
    return None if shape is None or shape.rank() != 3 else ir.Shape([shape[0], shape[1], 1, shape[2]])


def _with_height(array: np.ndarray) -> np.ndarray:
    """A constant that broadcast against [N, C, L], made to broadcast alike against [N, C, 1, L]."""
    return array if array.ndim < 2 else array.reshape(*array.shape[:-1], 1, array.shape[-1])


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    found = attr(node, "axes", None)
    return None if found is None else [int(a) for a in found]


def _reduce_over_map(graph: ir.Graph, node: ir.Node) -> None:
    """A reduction over L becomes one over (1, L)."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        node.replace_input_with(1, new_initializer(graph, f"{node.name}.axes_2d", np.array([2, 3], np.int64)))
    else:
        node.attributes["axes"] = ir.AttrInt64s("axes", [2, 3])


def _two_d_window(node: ir.Node) -> None:
    """kernel, strides, dilations and pads of a 1-D window, as the height-1 2-D window (absent ones default alike)."""
    for name in ("kernel_shape", "strides", "dilations"):
        found = attr(node, name, None)
        if found is not None:
            node.attributes[name] = ir.AttrInt64s(name, [1, int(found[0])])
    begin, end = (int(p) for p in attr(node, "pads", [0, 0]))
    node.attributes["pads"] = ir.AttrInt64s("pads", [0, begin, 0, end])
