"""Adaptive average pooling as ONNX ops every converter reads, for capture's exporter.

PyTorch's exporter writes an adaptive pool whose input size is not a multiple of its output size as index
arithmetic (Transpose, GatherND over run-time indices), which no bit-packed or NIR graph can hold. Its bins are
fixed by the static spatial size, so this translation writes them as what they are: one Slice and mean per bin,
along each pooled axis in turn (a mean of equal-length row means is the bin's mean). Sizes that divide evenly
keep the exporter's own forms: a global mean (ReduceMean) or a strided AveragePool.
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


def _pool_axis(x, axis: int, bins: list[tuple[int, int]]):
    parts = [op.ReduceMean(op.Slice(x, op.Constant(value_ints=[start]), op.Constant(value_ints=[end]),
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


TRANSLATIONS = {torch.ops.aten.adaptive_avg_pool2d.default: adaptive_avg_pool2d}


def _legacy_symbolic(g, x, output_size):
    """The same bins for torch's TorchScript exporter, which refuses sizes that do not divide evenly."""
    from torch.onnx import symbolic_helper

    sizes = symbolic_helper._get_tensor_sizes(x)
    try:
        outs = [int(o) for o in symbolic_helper._parse_arg(output_size, "is")]
    except (RuntimeError, TypeError, ValueError):
        return symbolic_helper._onnx_unsupported("adaptive pooling to a size computed at run time", x)
    if all(o == 1 for o in outs):  # one bin per axis: the whole plane, whatever its size (a trace may not say it)
        return g.op("ReduceMean", x, g.op("Constant", value_t=torch.tensor(list(range(-len(outs), 0)))), keepdims_i=1)
    first = len(sizes) - len(outs) if sizes else 0
    if not sizes or any(d is None for d in sizes[first:]):
        return symbolic_helper._onnx_unsupported("adaptive pooling of an input of unknown spatial size", x)
    kernel, uneven = _plan(sizes[first:], outs)
    if kernel is not None:
        return g.op("AveragePool", x, kernel_shape_i=kernel, strides_i=kernel)

    def const(values: list[int]):
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    for k, bins in uneven:
        axis = first + k
        parts = [g.op("ReduceMean", g.op("Slice", x, const([start]), const([end]), const([axis])), const([axis]),
                      keepdims_i=1) for start, end in bins]
        x = parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis_i=axis)
    return x


@contextlib.contextmanager
def legacy_symbolics(opset: int) -> Iterator[None]:
    """Registers the TorchScript exporter's adaptive average pools for the duration of one export."""
    names = ("aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d")
    for name in names:
        torch.onnx.register_custom_op_symbolic(name, _legacy_symbolic, opset)
    try:
        yield
    finally:
        for name in names:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
