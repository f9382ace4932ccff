"""Keep channels-last values channels-last: the transposes around each im2col product of ``onnx-int8``, removed.

An affine binary conv (``int8_layers._im2col_conv``) computes in NHWC and transposes its int32 sums back to
NCHW; the next one transposes its uint8 input to NHWC again. In a residual network everything between two such
convs is elementwise (the per-channel scale and shift, the residual add, the step, the uint8 encoding), so it
can run channels-last as well and both transposes go. Here each elementwise node whose runtime inputs include a
channels-last value gets a channels-last twin (per-channel constants permuted: a ``(C, 1, 1)`` scale becomes
``(1, 1, 1, C)``); a transpose to NHWC of a value with a twin becomes the twin; any other reader of a value that
has a twin (a pooling, a float conv, a graph output) reads it through one transpose back. The NCHW originals are
then unused and the clean-up removes them. Done only where it leaves fewer transposes (``to_channels_last``). Elementwise ops give the same numbers in either layout, so parity and
exactness are unchanged; only the memory order differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from htaf_export.passes.util import new_initializer

TO_NCHW = (0, 3, 1, 2)
TO_NHWC = (0, 2, 3, 1)
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "GreaterOrEqual", "Greater", "LessOrEqual", "Less",
                         "Equal", "Where", "Not", "And", "Or", "Relu", "Neg", "Abs"})


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    if node.domain != "" or node.op_type != "Transpose" or "perm" not in node.attributes:
        return None
    return tuple(node.attributes["perm"].as_ints())


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


@dataclass
class ChannelsLast:
    """Rewrites ``graph`` in place (``run``); ``twins`` maps id(NCHW value) → its channels-last twin."""

    graph: ir.Graph
    twins: dict[int, ir.Value] = field(default_factory=dict)
    twinned: set[int] = field(default_factory=set)  # ids of the NCHW nodes that have twins
    _constants: dict[int, ir.Value] = field(default_factory=dict)
    _transposed: dict[tuple[int, tuple[int, ...]], ir.Value] = field(default_factory=dict)
    _originals: dict[int, ir.Value] = field(default_factory=dict)  # id(NCHW value) → the value itself

    def run(self) -> dict[int, ir.Value]:
        self.graph.sort()
        for node in list(self.graph):
            perm = _perm(node)
            if perm == TO_NCHW:
                self._pair(node.outputs[0], node.inputs[0])  # type: ignore[arg-type]
            elif node.domain == "" and node.op_type in ELEMENTWISE:
                self._twin(node)
        self._reroute()
        return self.twins

    def _pair(self, nchw: ir.Value, nhwc: ir.Value) -> None:
        self.twins[id(nchw)] = nhwc
        self._originals[id(nchw)] = nchw

    def _twin(self, node: ir.Node) -> None:
        kinds = [self._kind(v) for v in node.inputs]
        if "twin" not in kinds or "no" in kinds:
            return
        inputs: list[ir.Value | None] = []
        for value, kind in zip(node.inputs, kinds):
            if value is None:
                inputs.append(None)
            elif kind == "twin":
                inputs.append(self.twins[id(value)])
            elif kind == "constant":
                inputs.append(self._constant(value))
            else:
                inputs.append(self._transpose(value, TO_NHWC, after=value.producer()))
        twin = ir.node(node.op_type, inputs, {k: v for k, v in node.attributes.items()}, name=f"{node.name}/nhwc",
                       num_outputs=len(node.outputs))
        self.graph.insert_after(node, twin)
        for old, new in zip(node.outputs, twin.outputs):
            new.name = f"{old.name}.nhwc"
            if old.dtype is not None:
                new.dtype = old.dtype
            self._pair(old, new)
        self.twinned.add(id(node))

    def _kind(self, value: ir.Value | None) -> str:
        """How an input of an elementwise node reaches its twin: "twin", "constant" (permuted), "nchw" (a 4-D
        value transposed once), "none" (absent) or "no" (a runtime value of unknown rank: the node stays)."""
        if value is None:
            return "none"
        if id(value) in self.twins:
            return "twin"
        if value.const_value is not None:
            return "constant" if value.const_value.numpy().ndim <= 4 else "no"
        return "nchw" if _rank(value) == 4 else "no"

    def _constant(self, value: ir.Value) -> ir.Value:
        array = value.const_value.numpy()  # type: ignore[union-attr]
        if array.size == 1:
            return value  # a scalar broadcasts alike in both layouts
        key = id(value)
        if key not in self._constants:
            padded = array.reshape((1,) * (4 - array.ndim) + array.shape).transpose(TO_NHWC)
            self._constants[key] = new_initializer(self.graph, f"{value.name}.nhwc", np.ascontiguousarray(padded))
        return self._constants[key]

    def _transpose(self, value: ir.Value, perm: tuple[int, ...], after: ir.Node | None) -> ir.Value:
        key = (id(value), perm)
        if key not in self._transposed:
            node = ir.node("Transpose", [value], {"perm": list(perm)},
                           name=f"{value.name}/{'to_nhwc' if perm == TO_NHWC else 'to_nchw'}")
            if after is None:
                self.graph.insert_before(next(iter(self.graph)), node)
            else:
                self.graph.insert_after(after, node)
            node.outputs[0].name = f"{value.name}.{'nhwc' if perm == TO_NHWC else 'nchw'}"
            if value.dtype is not None:
                node.outputs[0].dtype = value.dtype
            self._transposed[key] = node.outputs[0]
        return self._transposed[key]

    def _reroute(self) -> None:
        """Readers of an NCHW value that has a twin read the twin (a transpose to NHWC) or its transpose back."""
        for key, twin in self.twins.items():
            original = self._originals[key]
            for use in list(original.uses()):
                reader = use.node
                if id(reader) in self.twinned or reader.name.endswith("/nhwc"):
                    continue
                if _perm(reader) == TO_NHWC:
                    ir.convenience.replace_all_uses_with(reader.outputs[0], twin)
                elif _perm(reader) != TO_NCHW or reader.inputs[0] is not twin:
                    reader.replace_input_with(use.idx, self._transpose(twin, TO_NCHW, after=twin.producer()))


def _transposes(model: ir.Model) -> int:
    common_passes.RemoveUnusedNodesPass()(model)
    return sum(1 for n in model.graph if n.op_type == "Transpose" and n.domain == "")


def to_channels_last(model: ir.Model) -> dict[int, ir.Value]:
    """``ChannelsLast`` on ``model`` where it leaves fewer transposes than it found (tried on a copy first: a
    network with one im2col product between threshold layers can need more), else nothing; → the twins."""
    trial = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    before = _transposes(trial)
    ChannelsLast(trial.graph).run()
    if _transposes(trial) >= before:
        return {}
    return ChannelsLast(model.graph).run()


__all__ = ["ChannelsLast", "to_channels_last"]
