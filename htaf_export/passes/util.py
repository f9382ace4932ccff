"""Small helpers shared by the IR passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..ops import HTAF_DOMAIN


# Which input of each ONNX op holds its weight.
WEIGHT_INPUTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
# The same for the integer ops of onnx-int8.
INTEGER_WEIGHT_INPUTS = {"QLinearConv": 3, "MatMulInteger": 1}


def attr(node: ir.Node, name: str, default):
    """An attribute's value, or ``default`` when the node does not set it."""
    found = node.attributes.get(name)
    return default if found is None else found.value


def is_step(node: ir.Node | None, ops: tuple[str, ...] = ("Sign", "Heaviside")) -> bool:
    """A step op of the htaf domain (one of ``ops``)."""
    return node is not None and node.domain == HTAF_DOMAIN and node.op_type in ops

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


def _holding(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value | None:
    """The initializer ``name`` or ``name_k`` (as ``new_initializer`` names them) that holds ``array``, if any."""
    candidate, k = name, 1
    while candidate in graph.initializers:
        held = const_array(graph.initializers[candidate])
        if held is not None and held.dtype == array.dtype and held.shape == array.shape and np.array_equal(held, array):
            return graph.initializers[candidate]
        candidate, k = f"{name}_{k}", k + 1
    return None


def replacing_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """``new_initializer`` under ``name`` itself when the initializer of that name is no longer used (a layer
    being rewritten keeps its parameter's name instead of ``name_1``), or that initializer itself when it holds
    ``array`` already (a weight read at every time step is stored once)."""
    same = _holding(graph, name, array)
    if same is not None:
        return same
    old = graph.initializers.get(name)
    if old is not None and not old.uses() and not old.is_graph_output():
        graph.initializers.pop(name)
    return new_initializer(graph, name, array)


def sign_factor(array: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(±1 signs, positive scale per index of ``axis`` or None when it is 1 everywhere) with array = signs·scale;
    None when ``array`` is not of that form (float32, every magnitude equal within a channel, none 0)."""
    if array.dtype != np.float32 or array.size == 0 or array.ndim == 0:
        return None
    flat = np.abs(np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1))
    scale = flat[:, 0]
    if not np.all(flat == scale[:, None]) or not np.all(scale > 0):
        return None
    signs = np.where(array >= 0, 1.0, -1.0).astype(np.float32)
    return signs, (None if np.all(scale == 1.0) else scale.astype(np.float32))


def zeros_among_signs(array: np.ndarray, axis: int = 0) -> int:
    """How many elements are exactly 0 in an array that is otherwise ±scale per channel (sign(0) = 0 of an
    inline sign(w)); 0 when the array is binary or not of that form at all."""
    if array.dtype != np.float32 or array.ndim == 0 or not np.any(array == 0):
        return 0
    flat = np.abs(np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1))
    for row in flat:
        nonzero = row[row != 0]
        if nonzero.size and not np.all(nonzero == nonzero[0]):
            return 0
    return int(np.sum(array == 0))


MODULE_PARAMETERS = ("weight", "bias", "latent")  # what torch's and this package's layers call their parameters
DERIVED_SUFFIXES = (".packed", ".unpacked", ".shape", ".numel", ".scale", ".bipolar", ".folded", ".transposed")


def layer_of(weight_name: str) -> str:
    """The layer a weight tensor belongs to: its parameter name without the parameter itself
    (``layers.conv2.weight`` → ``layers.conv2``, ``bconv.latent.packed`` → ``bconv``). A parameter a user
    named (``body.k1``, or ``kernels.0`` of a ParameterList) is its own layer: two of them in one module are
    two layers. A parametrized weight (``body.parametrizations.weight.original``) is its module's."""
    name = weight_name
    for suffix in DERIVED_SUFFIXES:
        name = name.removesuffix(suffix)
    owner, parametrized, _ = name.partition(".parametrizations.")  # torch.nn.utils.parametrize's own path
    if parametrized and owner:
        return owner
    owner, _, parameter = name.rpartition(".")
    return owner if owner and parameter in MODULE_PARAMETERS else name


def layer_of_weight(weight_name: str, node: ir.Node) -> str:
    """``layer_of`` a weight, or for a weight the exporter made and named itself (``onnx::MatMul_39``: a linear
    layer's transposed matrix in a TorchScript capture) the module path of the node that reads it."""
    return (layer_of_node(str(node.name or "")) or layer_of(weight_name)) if "::" in weight_name else \
        layer_of(weight_name)


def layer_of_node(node_name: str) -> str:
    """The module path the ONNX exporter writes into a node's name (``/layers/0/Conv`` → ``layers.0``), for a
    weight the exporter made itself (``onnx::Conv_29``: a batch norm folded into it, a transposed matrix)."""
    return ".".join(part for part in node_name.split("/")[1:-1] if part)


def distinct_names(graph: ir.Graph) -> dict[str, str]:
    """Give repeated node names and repeated names of computed values a suffix (``@1``, ``@2``), in graph order: a
    lowering names what it writes after the layer, and a layer called at several time steps (a recurrent weight)
    is lowered once per call. Returns {new value name: the name it repeated} (annotations keyed by value name
    apply to both). Graph outputs keep their names."""
    nodes: set[str] = set()
    values = {v.name for v in [*graph.inputs, *graph.initializers.values()] if v.name}
    kept = {v.name for v in graph.outputs}
    renamed: dict[str, str] = {}

    def fresh(name: str, taken: set[str]) -> str:
        k = 1
        while f"{name}@{k}" in taken:
            k += 1
        return f"{name}@{k}"

    for node in graph:
        if node.name:
            node.name = fresh(node.name, nodes) if node.name in nodes else node.name
            nodes.add(node.name)
        for value in node.outputs:
            if value.name in values and value.name not in kept:
                new = fresh(value.name, values)
                renamed[new], value.name = value.name, new
            if value.name:
                values.add(value.name)
    return renamed
