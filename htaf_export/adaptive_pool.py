"""Adaptive average and max pooling as ONNX ops every converter reads, for capture's exporter.

PyTorch's exporter writes an adaptive pool whose input size is not a multiple of its output size as index
arithmetic (Transpose, GatherND over run-time indices), which no bit-packed or NIR graph can hold. Its bins are
fixed by the static spatial size, so this translation writes them as what they are: one Slice and mean per bin,
along each pooled axis in turn (a mean of equal-length row means is the bin's mean). Sizes that divide evenly
keep the exporter's own forms: a global mean (ReduceMean) or a strided AveragePool. Max pooling, which
torch's exporter does not translate at all, is the same with ReduceMax and MaxPool (a max of row maxima is the
bin's max); its indices, which models rarely read, come per bin from an ArgMax (the first maximum, as PyTorch).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from onnxscript import opset18 as op


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive bins along one axis: [floor(i·size/out), ceil((i+1)·size/out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _plan(sizes: Sequence[int], outs: Sequence[int]) -> tuple[list[int] | None, list[tuple[int, list]]]:
    """How to pool trailing axes of ``sizes`` to ``outs``: the AveragePool kernel where every size divides evenly
    (else None), and otherwise (offset from the first pooled axis, its bins) for each axis that changes size."""
    if all(s % o == 0 for s, o in zip(sizes, outs)):
        return [s // o for s, o in zip(sizes, outs)], []
    return None, [(k, _bins(s, o)) for k, (s, o) in enumerate(zip(sizes, outs)) if s != o]


def _pool_axis(x, axis: int, bins: list[tuple[int, int]], reduce=op.ReduceMean):
    parts = [reduce(op.Slice(x, op.Constant(value_ints=[start]), op.Constant(value_ints=[end]),
                             op.Constant(value_ints=[axis])), op.Constant(value_ints=[axis]), keepdims=1)
             for start, end in bins]
    return parts[0] if len(parts) == 1 else op.Concat(*parts, axis=axis)


def adaptive_avg_pool2d(x, output_size: Sequence[int]):
    """aten.adaptive_avg_pool2d on [N, C, H, W] (or [C, H, W]); PyTorch's 1-D pool reaches here with H = 1."""
    rank = len(x.shape)
    sizes = [int(d) for d in x.shape[rank - 2:]]  # static: the exporter fixes every axis but the batch
    outs = [int(o) for o in output_size]
    if outs == [1, 1]:
        return op.ReduceMean(x, op.Constant(value_ints=[rank - 2, rank - 1]), keepdims=1)
    kernel, uneven = _plan(sizes, outs)
    if kernel is not None:
        return op.AveragePool(x, kernel_shape=kernel, strides=kernel)
    for k, bins in uneven:
        x = _pool_axis(x, rank - 2 + k, bins)
    return x


def adaptive_max_pool2d(x, output_size: Sequence[int]):
    """aten.adaptive_max_pool2d → (values, indices into each H·W plane); the 1-D pool reaches here with H = 1."""
    rank = len(x.shape)
    sizes = [int(d) for d in x.shape[rank - 2:]]
    outs = [int(o) for o in output_size]
    kernel, uneven = _plan(sizes, outs)
    if kernel is not None:
        values, _ = op.MaxPool(x, kernel_shape=kernel, strides=kernel)  # (values, indices over N·C·H·W)
    else:
        values = x
        for k, bins in uneven:
            values = _pool_axis(values, rank - 2 + k, bins, op.ReduceMax)
    return values, _max_indices(x, rank, sizes, outs)


def _max_indices(x, rank: int, sizes: Sequence[int], outs: Sequence[int]):
    """Where each bin's first maximum lies, as h·W + w: an ArgMax over the bin's flattened window."""
    rows = []
    for h0, h1 in _bins(sizes[0], outs[0]):
        row = []
        for w0, w1 in _bins(sizes[1], outs[1]):
            window = op.Slice(x, op.Constant(value_ints=[h0, w0]), op.Constant(value_ints=[h1, w1]),
                              op.Constant(value_ints=[rank - 2, rank - 1]))
            flat = op.Reshape(window, op.Constant(value_ints=[0] * (rank - 2) + [-1]))
            k = op.Unsqueeze(op.ArgMax(flat, axis=-1, keepdims=1), op.Constant(value_ints=[-1]))
            width = op.Constant(value_ints=[w1 - w0])
            h = op.Add(op.Div(k, width), op.Constant(value_ints=[h0]))
            w = op.Add(op.Mod(k, width), op.Constant(value_ints=[w0]))
            row.append(op.Add(op.Mul(h, op.Constant(value_ints=[sizes[1]])), w))
        rows.append(row[0] if len(row) == 1 else op.Concat(*row, axis=-1))
    return rows[0] if len(rows) == 1 else op.Concat(*rows, axis=-2)


TRANSLATIONS = {torch.ops.aten.adaptive_avg_pool2d.default: adaptive_avg_pool2d,
                torch.ops.aten.adaptive_max_pool2d.default: adaptive_max_pool2d}


def _legacy_symbolic(g, x, output_size, reduce: str = "ReduceMean", window: str = "AveragePool"):
    """The same bins for torch's TorchScript exporter, which refuses sizes that do not divide evenly."""
    from torch.onnx import symbolic_helper

    sizes = symbolic_helper._get_tensor_sizes(x)
    try:
        outs = [int(o) for o in symbolic_helper._parse_arg(output_size, "is")]
    except (RuntimeError, TypeError, ValueError):
        return symbolic_helper._onnx_unsupported("adaptive pooling to a size computed at run time", x)
    if all(o == 1 for o in outs):  # one bin per axis: the whole plane, whatever its size (a trace may not say it)
        return g.op(reduce, x, g.op("Constant", value_t=torch.tensor(list(range(-len(outs), 0)))), keepdims_i=1)
    first = len(sizes) - len(outs) if sizes else 0
    if not sizes or any(d is None for d in sizes[first:]):
        return symbolic_helper._onnx_unsupported("adaptive pooling of an input of unknown spatial size", x)
    kernel, uneven = _plan(sizes[first:], outs)
    if kernel is not None:
        return g.op(window, x, kernel_shape_i=kernel, strides_i=kernel)

    def const(values: list[int]):
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    for k, bins in uneven:
        axis = first + k
        parts = [g.op(reduce, g.op("Slice", x, const([start]), const([end]), const([axis])), const([axis]),
                      keepdims_i=1) for start, end in bins]
        x = parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis_i=axis)
    return x


def _legacy_max(g, x, output_size):
    """Max pooling's values; its indices are not written (a model that reads them is refused by the exporter)."""
    return _legacy_symbolic(g, x, output_size, "ReduceMax", "MaxPool"), None


@contextlib.contextmanager
def legacy_symbolics(opset: int) -> Iterator[None]:
    """Registers the TorchScript exporter's adaptive pools for the duration of one export."""
    symbolics = {"aten::adaptive_avg_pool1d": _legacy_symbolic, "aten::adaptive_avg_pool2d": _legacy_symbolic,
                 "aten::adaptive_max_pool1d": _legacy_max, "aten::adaptive_max_pool2d": _legacy_max}
    names = tuple(symbolics)
    for name, symbolic in symbolics.items():
        torch.onnx.register_custom_op_symbolic(name, symbolic, opset)
    try:
        yield
    finally:
        for name in names:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
