"""The PyTorch shape (without the batch) of an IR value, and of a Keras tensor stored in a layout
(``keras_builder`` describes the layouts)."""

from __future__ import annotations

import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer


def static_shape(value: ir.Value) -> tuple[int, ...]:
    """PyTorch shape of ``value`` without the batch, from the IR; every dimension but the batch must be known."""
    shape = value.shape
    dims = list(shape)[1:] if shape is not None else None
    if dims is None or len(shape) == 0 or not all(isinstance(d, int) for d in dims):  # type: ignore[arg-type]
        raise UnsupportedLayer(value.name or "?", f"the IR does not know the shape of this tensor ({shape})")
    return tuple(int(d) for d in dims)


def torch_shape(tensor, layout: str) -> tuple[int, ...]:
    """PyTorch shape (without the batch) of a Keras tensor stored in ``layout`` (not nhwc_flat)."""
    dims = tuple(int(d) for d in tensor.shape[1:])
    if layout == "nhwc":
        h, w, c = dims
        return (c, h, w)
    if layout == "pixel":
        return (dims[-1],)
    return dims


def permuted_to_channels_first(value: ir.Value) -> bool:
    """An input the model itself turns from channels last to first: the file takes it as the model does."""
    uses = [u for u in value.uses() if u.node.op_type != "Shape"]  # reading the batch size moves no data
    return bool(uses) and all(u.node.op_type == "Transpose" and list(u.node.attributes.get_ints("perm", [])) ==
                              [0, 3, 1, 2] for u in uses)
