"""Keras emitters for the ops that move or reshape tensors (transpose, reshape/flatten/squeeze, concat,
expand, tile) and for the exporter's shape arithmetic on the batch size, which Keras does not need."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from htaf_export.errors import UnsupportedLayer
from htaf_export.passes.util import attr, const_array

from .keras_builder import NHWC_AXIS, KerasBuilder, Val, keras, tf
from .layouts import static_shape, torch_shape


def transpose(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """A permutation of the per-sample axes (the batch stays first), on the PyTorch tensor. Between channels
    last and channels first of a 4-D tensor it moves nothing: the stored tensor is already the result."""
    x = b.real(node.inputs[0])
    perm = [int(p) for p in attr(node, "perm", list(range(len(x.shape), -1, -1)))]
    if perm == [0, 3, 1, 2] and x.layout == "plain" and len(x.shape) == 3:  # [H, W, C] → [C, H, W], stored NHWC
        return [Val(x.tensor, (x.shape[2], x.shape[0], x.shape[1]), "nhwc", presign=x.presign)]
    if perm == [0, 2, 3, 1] and x.layout == "nhwc":
        return [Val(x.tensor, (x.shape[1], x.shape[2], x.shape[0]), "plain", presign=x.presign)]
    x = b.to_plain(x)
    if not perm or perm[0] != 0:
        raise UnsupportedLayer(node.name, f"Transpose {perm} moves the batch axis")
    t = b.lam(lambda z: tf.transpose(z, perm), x.tensor, node.name or "transpose")
    return [b.to_canonical(Val(t, tuple(x.shape[p - 1] for p in perm[1:]), "plain", presign=x.presign))]


def identity(b: KerasBuilder, node: ir.Node) -> list[Val]:
    return [b.get(node.inputs[0])]


def shape_only(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """Shape arithmetic on the batch size (the exporter's dynamic-batch flatten and zeros): not needed in Keras."""
    data = [b.get(v) for v in node.inputs if v is not None]
    if node.op_type == "ConstantOfShape":  # zeros shaped [batch, …]: a batch-broadcast constant
        fill = node.attributes.get("value")
        value = fill.value.numpy().reshape(()) if fill is not None else np.zeros((), np.float32)
        shape = node.outputs[0].shape
        if shape is None or not all(isinstance(d, int) for d in list(shape)[1:]):
            target = _batch_shape(b, node.inputs[0])  # a TorchScript trace leaves the output unshaped
            if target is None:
                raise UnsupportedLayer(node.name, "constant of a shape computed at run time")
            return [Val(const=np.full((1, *target), value, dtype=np.float32))]
        return [Val(const=np.full((1,) + static_shape(node.outputs[0]), value, dtype=np.float32))]
    known = _sample_dim(b, node)
    if known is not None:  # x.shape[1] of a traced loop (out / T): per-sample dimensions are fixed in the file
        return [Val(const=known, shape=())]
    if node.op_type == "Shape" or any(v.shape_only for v in data) and all(v.tensor is None for v in data):
        return [Val(shape_only=True) for _ in node.outputs]
    if node.op_type in ("Cast", "CastLike") and data and data[0].const is not None:  # a weight cast to its use
        dtype = node.outputs[0].dtype
        return [Val(const=np.asarray(data[0].const, dtype.numpy() if dtype is not None else np.float32))]
    if node.op_type in ("Cast", "CastLike") and data and data[0].tensor is not None:  # (x > 0).long() as an output
        x, dtype = b.real(node.inputs[0]), node.outputs[0].dtype
        wanted = tf.as_dtype(dtype.numpy()) if dtype is not None else tf.float32
        t = x.tensor if x.tensor.dtype == wanted else b.lam(lambda z: tf.cast(z, wanted), x.tensor, node.name or "cast")
        return [Val(t, x.shape, x.layout, presign=x.presign if wanted == tf.float32 else None)]
    if node.op_type in ("Reshape", "Squeeze", "Unsqueeze"):
        return reshape(b, node)
    if node.op_type == "Concat":
        return concat(b, node)
    if node.op_type == "Slice":
        return crop(b, node)
    if node.op_type == "Gather":
        return select(b, node)
    raise UnsupportedLayer(node.name, f"{node.op_type} on tensors is not supported")


def select(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """A Gather of one constant index on a per-sample axis (``x[:, t]``: a spiking loop reading its input one
    time step at a time): a STRIDED_SLICE that drops the axis, exact."""
    x = b.get(node.inputs[0])
    index = b.get(node.inputs[1]).const
    if x.tensor is None or index is None or np.size(index) != 1:
        raise UnsupportedLayer(node.name, "Gather of a computed index, or of several indices")
    x = b.to_plain(b.real(node.inputs[0]))
    rank = len(x.shape) + 1
    axis = int(attr(node, "axis", 0)) % rank
    if axis == 0:
        raise UnsupportedLayer(node.name, "Gather on the batch axis")
    k = int(np.asarray(index).reshape(())) % x.shape[axis - 1]
    taken = (slice(None),) * axis + (k,)
    shape = tuple(d for i, d in enumerate(x.shape) if i != axis - 1)
    t = b.lam(lambda z: z[taken], x.tensor, node.name or "select")
    return [b.to_canonical(Val(t, shape, "plain", presign=x.presign))]


def crop(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """A Slice with constant bounds (``y[:, :, 1:4, :5]``; a negative step: ``flip``), on the PyTorch tensor."""
    x = b.get(node.inputs[0])
    if x.tensor is None:
        raise UnsupportedLayer(node.name, "Slice of a constant that capture did not fold")
    given = list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))  # axes and steps are optional inputs
    bounds = [b.get(v).const if v is not None else None for v in given]
    if any(c is None for v, c in zip(given, bounds) if v is not None):
        raise UnsupportedLayer(node.name, "Slice with bounds computed at run time")
    starts, ends = (np.asarray(c).reshape(-1) for c in bounds[:2])
    axes = np.asarray(bounds[2]).reshape(-1) if bounds[2] is not None else np.arange(len(starts))
    steps = np.asarray(bounds[3]).reshape(-1) if bounds[3] is not None else np.ones(len(starts), np.int64)
    x = b.real(node.inputs[0])
    x = x if x.layout == "nhwc" else b.to_plain(x)
    stored = NHWC_AXIS if x.layout == "nhwc" else {}  # a channels-last map is sliced where it lies
    rank = len(x.shape) + 1
    index, shape = [slice(None)] * rank, list(x.shape)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        axis = int(axis) % rank
        if step == 0:
            raise UnsupportedLayer(node.name, "Slice with a zero step")
        if axis == 0:
            if start != 0 or end < np.iinfo(np.int32).max or step != 1:
                raise UnsupportedLayer(node.name, "Slice across the batch axis")
            continue
        taken_axis = slice(int(max(start, -2**31)), int(min(end, 2**31 - 1)), int(step))
        if step < 0:  # TF reads an end below −size as −1 (before the last element), Python as the start: say None
            size = shape[axis - 1]
            taken_axis = slice(None if start >= size else taken_axis.start, None if end < -size else taken_axis.stop,
                               int(step))
        index[stored.get(axis, axis)] = taken_axis
        shape[axis - 1] = len(range(*taken_axis.indices(shape[axis - 1])))
    taken = tuple(index)
    t = b.lam(lambda z: z[taken], x.tensor, node.name or "slice")
    return [b.to_canonical(Val(t, tuple(shape), x.layout, presign=x.presign))]


def split(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """Split into parts along a per-sample axis (``torch.chunk``, ``split``; a GRU or LSTM cell's gates): one
    strided slice a part, on the PyTorch tensor; a batch-broadcast constant (a gate of the zero state) in numpy."""
    held = b.get(node.inputs[0])
    folded = held.tensor is None and held.const is not None
    x = Val(shape=tuple(np.shape(held.const)[1:])) if folded else b.to_plain(b.real(node.inputs[0]))
    rank = len(x.shape) + 1
    axis = int(attr(node, "axis", 0)) % rank
    if axis == 0:
        raise UnsupportedLayer(node.name, "Split across the batch axis")
    sizes = b.get(node.inputs[1]).const if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is None:
        parts, size = len(node.outputs), x.shape[axis - 1]
        sizes = [-(-size // parts)] * (parts - 1) + [size - -(-size // parts) * (parts - 1)]
    ends = np.cumsum(np.asarray(sizes, np.int64).reshape(-1))
    if folded:
        return [Val(const=part) for part in np.split(np.asarray(held.const), ends[:-1], axis=axis)]
    outputs = []
    for k, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
        index = tuple([slice(None)] * axis + [slice(int(start), int(end))])
        t = b.lam(lambda z, index=index: z[index], x.tensor, f"{node.name or 'split'}_{k}")
        shape = tuple(int(end - start) if i == axis - 1 else d for i, d in enumerate(x.shape))
        outputs.append(b.to_canonical(Val(t, shape, "plain", presign=x.presign)))
    return outputs


def reshape(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """Reshape, Flatten, Squeeze, Unsqueeze: the output's static shape says what to do."""
    x = b.get(node.inputs[0])
    if x.tensor is None:
        if x.const is not None:
            return [_reshaped_constant(b, node, np.asarray(x.const))]
        return [Val(shape_only=True)]
    out_shape = _reshape_target(b, node, x)
    if out_shape == x.shape:
        return [x]
    if len(out_shape) == 1 and int(np.prod(x.shape)) == out_shape[0]:
        if x.layout == "nhwc":  # flatten: keep NHWC storage; consumers permute their weights
            return [Val(x.tensor, out_shape, "nhwc_flat", presign=x.presign, source=x.shape)]
        if x.layout == "nhwc_flat":
            return [replace(x, shape=out_shape)]
    if len(out_shape) == 3 and x.layout == "nhwc_flat" and tuple(out_shape) == x.source:
        return [Val(x.tensor, out_shape, "nhwc", presign=x.presign)]
    p = b.to_plain(x)
    t = b.reshape(p.tensor, out_shape, node.name or "reshape")
    return [b.to_canonical(Val(t, out_shape, "plain", presign=x.presign))]


def _reshaped_constant(b: KerasBuilder, node: ir.Node, const: np.ndarray) -> Val:
    """A reshape of a batch-1 constant the converter folded itself (a zero initial state times a leak, lifted
    to 2-D for a Conv1d): the same reshape in numpy."""
    axes = const_array(node.inputs[1]) if node.op_type == "Unsqueeze" and len(node.inputs) > 1 else None
    if const.ndim == 0 and axes is not None:  # shape arithmetic: a traced size (c // groups) made a 1-D shape
        return Val(const=np.expand_dims(const, tuple(int(a) for a in axes.reshape(-1))))
    if const.ndim == 0 or const.shape[0] != 1:
        raise UnsupportedLayer(node.name, "reshape of a constant that capture did not fold")
    out_shape = _reshape_target(b, node, Val(shape=const.shape[1:]))
    if int(np.prod(out_shape)) != const.size:
        raise UnsupportedLayer(node.name, f"reshape of a constant of shape {const.shape[1:]} to {out_shape}")
    return Val(const=const.reshape((1, *out_shape)))


def _reshape_target(b: KerasBuilder, node: ir.Node, x: Val) -> tuple[int, ...]:
    """The PyTorch shape (without the batch) a Reshape/Flatten/Squeeze/Unsqueeze produces."""
    size = int(np.prod(x.shape))
    if node.op_type == "Flatten":
        axis = int(attr(node, "axis", 1))
        if axis != 1:
            raise UnsupportedLayer(node.name, f"Flatten with axis {axis}")
        return (size,)
    shape = node.outputs[0].shape
    if shape is not None and len(shape) and all(isinstance(d, int) for d in list(shape)[1:]):
        return static_shape(node.outputs[0])
    if node.op_type in ("Squeeze", "Unsqueeze"):
        return _squeezed(node, x.shape)
    target = b.get(node.inputs[1]).const if node.op_type == "Reshape" and len(node.inputs) > 1 else None
    if target is None and node.op_type == "Reshape" and len(node.inputs) > 1:
        target = _batch_then_constants(b, node.inputs[1])
        like = _batch_shape(b, node.inputs[1]) if target is None else None  # back to another tensor's shape
        if like is not None:
            return like
    if target is None or target.ndim != 1 or len(target) < 1:
        raise UnsupportedLayer(node.name, f"{node.op_type} to a shape the IR does not know")
    dims = [x.shape[i - 1] if d == 0 and 0 < i <= len(x.shape) else int(d) for i, d in enumerate(target)][1:]
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1]))
        dims[dims.index(-1)] = size // known
    return tuple(dims)


def _squeezed(node: ir.Node, shape: tuple[int, ...]) -> tuple[int, ...]:
    """What Squeeze/Unsqueeze over constant axes makes of ``shape`` (a TorchScript capture leaves it unshaped)."""
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None:
        raise UnsupportedLayer(node.name, f"{node.op_type} over axes the IR does not know")
    dims = [0, *shape]  # the batch at 0, as ONNX counts axes
    rank = len(dims) + (axes.size if node.op_type == "Unsqueeze" else 0)
    wanted = sorted(int(a) % rank for a in axes.reshape(-1))
    if 0 in wanted:
        raise UnsupportedLayer(node.name, f"{node.op_type} of the batch axis")
    if node.op_type == "Squeeze":
        return tuple(d for i, d in enumerate(dims) if i not in wanted)[1:]
    for axis in wanted:
        dims.insert(axis, 1)
    return tuple(dims[1:])


def _sample_dim(b: KerasBuilder, node: ir.Node) -> np.ndarray | None:
    """``Gather(Shape(x), k)`` for k ≥ 1 of a tensor whose per-sample shape is known: that dimension; and
    ``Slice(Shape(x), k, …)`` for k ≥ 1 (``nn.Unflatten`` traced): those dimensions."""
    if node.op_type == "Slice":
        return _sample_dims(b, node)
    shape = _whole_shape(node.inputs[0]) if node.op_type == "Gather" else None
    index = const_array(node.inputs[1]) if shape is not None and len(node.inputs) > 1 else None
    if shape is None or index is None or index.ndim != 0 or int(index) < 1:
        return None
    source = b.get(shape.inputs[0])
    if source.tensor is None or int(index) > len(source.shape):
        return None
    return np.asarray(source.shape[int(index) - 1], np.int64)  # Val.shape is PyTorch's, whatever the layout


def _sample_dims(b: KerasBuilder, node: ir.Node) -> np.ndarray | None:
    shape = _whole_shape(node.inputs[0])
    given = [b.get(v).const if v is not None else None for v in node.inputs[1:]]
    if shape is None or len(given) < 2 or any(c is None for c in given) or any(np.size(c) != 1 for c in given):
        return None
    source = b.get(shape.inputs[0])
    start, end, *rest = (int(np.asarray(c).reshape(())) for c in given)
    if source.tensor is None or (rest and rest[0] != 0) or (len(rest) > 1 and rest[1] != 1):
        return None
    dims = [-1, *source.shape]  # the batch, then the per-sample shape PyTorch sees
    first = range(len(dims))[slice(start, end)]
    if not first or first[0] >= 1:
        return np.asarray(dims[slice(start, end)], np.int64)
    return None


def _whole_shape(value: ir.Value | None) -> ir.Node | None:
    """The ``Shape`` node that gives ``value``, when it is the whole shape of one tensor (no start or end)."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Shape" or len(producer.inputs) != 1 or \
            int(attr(producer, "start", 0)) != 0 or producer.attributes.get("end") is not None:
        return None
    return producer


def _expanded_shape(b: KerasBuilder, node: ir.Node, x: Val) -> tuple[int, ...]:
    """The per-sample shape an Expand produces: from the IR, else from its target shape (``q.repeat(1, 2, 1, 1)``
    is an Expand to [batch, C, H, W] that the exporter leaves unshaped, then a Tile)."""
    shape = node.outputs[0].shape
    if shape is not None and all(isinstance(d, int) for d in list(shape)[1:]) or x.tensor is None:
        return static_shape(node.outputs[0])
    target = b.get(node.inputs[1]).const
    target = _batch_then_constants(b, node.inputs[1]) if target is None else target
    if target is None or len(target) > len(x.shape) + 1:
        raise UnsupportedLayer(node.name, "Expand to a shape the IR does not know")
    per_sample = [1 if d == -2 else int(d) for d in np.asarray(target).reshape(-1)][-len(x.shape):] if len(x.shape) else []
    return tuple(int(d) for d in np.broadcast_shapes(tuple(x.shape), tuple(per_sample)))


def tile(b: KerasBuilder, node: ir.Node) -> list[Val]:
    """``x.repeat(1, k, ...)``: a Tile with constant repeats that leave the batch alone, on the PyTorch tensor."""
    x = b.to_plain(b.real(node.inputs[0]))
    repeats = b.get(node.inputs[1]).const
    if repeats is None or len(repeats) != len(x.shape) + 1 or int(repeats[0]) != 1:
        raise UnsupportedLayer(node.name, "Tile with repeats that are not constant, or that repeat the batch")
    reps = [int(r) for r in repeats]
    t = b.lam(lambda z: tf.tile(z, reps), x.tensor, node.name or "tile")
    shape = tuple(d * r for d, r in zip(x.shape, reps[1:]))
    return [b.to_canonical(Val(t, shape, "plain", presign=x.presign))]


def _batch_then_constants(b: KerasBuilder, value: ir.Value | None) -> np.ndarray | None:
    """A traced ``view(x.size(0), ...)``: Concat(the batch size, constants) → [batch, constants...]."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Concat" or not producer.inputs:
        return None
    parts = [b.get(v) for v in producer.inputs]
    if not parts[0].shape_only or any(p.const is None for p in parts[1:]):
        return None
    return np.concatenate([[-2]] + [np.asarray(p.const).reshape(-1) for p in parts[1:]]).astype(np.int64)


def _batch_shape(b: KerasBuilder, value: ir.Value | None) -> tuple[int, ...] | None:
    """The per-sample part of a shape tensor [batch, ...]: Shape(a computed tensor) (zeros_like), or the batch
    size concatenated with constants (zeros(x.shape[0], ...))."""
    producer = _whole_shape(value)
    if producer is not None:
        source = b.get(producer.inputs[0])
        return tuple(source.shape) if source.tensor is not None else None
    target = _batch_then_constants(b, value)
    return tuple(int(d) for d in target[1:]) if target is not None else None


def concat(b: KerasBuilder, node: ir.Node) -> list[Val]:
    vals = [b.to_canonical(b.real(v)) for v in node.inputs]
    axis = int(attr(node, "axis", 1))
    rank = len(vals[0].shape) + 1
    axis = axis % rank
    layouts = {v.layout for v in vals}
    if len(layouts) != 1:
        raise UnsupportedLayer(node.name, "Concat of tensors in different layouts")
    keras_axis = NHWC_AXIS[axis] if "nhwc" in layouts else axis
    t = keras.layers.Concatenate(axis=keras_axis, name=b.name(node.name or "concat"))([v.tensor for v in vals])
    return [Val(t, torch_shape(t, vals[0].layout), vals[0].layout)]


def expand(b: KerasBuilder, node: ir.Node) -> list[Val]:
    x = b.get(node.inputs[0])
    out_shape = _expanded_shape(b, node, x)
    if x.tensor is None and x.const is not None:  # zeros for the initial state: a batch-broadcast constant
        out = np.broadcast_to(x.const, (1,) + out_shape).astype(np.float32)
        return [Val(const=out, shape=out.shape)]
    if x.shape == out_shape:
        return [x]
    raise UnsupportedLayer(node.name, f"Expand of a computed tensor to {out_shape}")


def positions(b: KerasBuilder, x: Val) -> Val | None:
    """A dense layer's input of more than one dimension ([N, L, F]: a layer at each position) as an [N, L, 1, F] map,
    whose 1×1 conv is the layer (bit-packed like any other); None for one vector per sample."""
    if len(x.shape) == 1:
        return None
    plain = b.to_plain(x)
    lead, features = plain.shape[:-1], plain.shape[-1]
    t = b.reshape(plain.tensor, (int(np.prod(lead)), 1, features), "positions")
    return Val(t, (features, int(np.prod(lead)), 1), "nhwc", presign=x.presign)


def per_position(b: KerasBuilder, y: Val, x: Val) -> Val:
    """The [N, L, 1, O] map of a dense layer at each position, as the PyTorch tensor [N, L, O]."""
    shape = (*x.shape[:-1], y.shape[0])
    return Val(b.reshape(y.tensor, shape, "per_position"), shape, "plain", presign=y.presign)
