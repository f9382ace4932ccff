"""Small helpers shared by the IR passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents, or None when it is computed at run time."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def unique_initializer_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_k`` with the smallest k that no initializer of ``graph`` uses yet."""
    taken = set(graph.initializers)
    unique, k = name, 1
    while unique in taken:
        unique, k = f"{name}_{k}", k + 1
    return unique


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer under a name not yet used in the graph."""
    unique = unique_initializer_name(graph, name)
    value = ir.Value(name=unique, const_value=ir.tensor(array, name=unique),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
    graph.register_initializer(value)
    return value
