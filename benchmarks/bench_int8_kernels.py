"""Which ONNX Runtime integer kernel a binary conv should use: one 3x3 conv, each form timed against float ``Conv``.

    python benchmarks/bench_int8_kernels.py [--runs N] [--channels C] [--size S]

A ±1 conv of C channels on S×S (zero padding 1), batch 1, one thread, median of ``--runs``. Each form's output is
checked against the float conv (exact integer sums, or the same signs) before it is timed. The baseline of every
ratio is float ``Conv`` in the same run. This is what decided the ops of ``converters/int8_layers.py``: operand
types decide whether ONNX Runtime's fast u8×s8 kernels run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import console, machine, median_ms, table  # noqa: E402


def _session(nodes, initializers, input_type: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", input_type, None)],
                              [helper.make_empty_tensor_value_info("y")], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _const(name: str, value, dtype) -> TensorProto:
    return numpy_helper.from_array(np.array(value, dtype), name)


def _im2col(taps_axes: list[int], concat_axis: int, size: int):
    """Nine strided slices of the padded input, concatenated: the im2col columns."""
    nodes, inits = [], [_const("axes", taps_axes, np.int64)]
    for i in range(3):
        for j in range(3):
            inits += [_const(f"s{i}{j}", [i, j], np.int64), _const(f"e{i}{j}", [i + size, j + size], np.int64)]
            nodes.append(helper.make_node("Slice", ["x", f"s{i}{j}", f"e{i}{j}", "axes"], [f"t{i}{j}"]))
    nodes.append(helper.make_node("Concat", [f"t{i}{j}" for i in range(3) for j in range(3)], ["col"], axis=concat_axis))
    return nodes, inits


def forms(weight: np.ndarray, x: np.ndarray, size: int) -> dict[str, tuple]:
    """name → (session, feed, check(output) -> bool)."""
    out_c, in_c = weight.shape[:2]
    u8 = (x + 1).astype(np.uint8)  # ±1 as {0, 2}, zero point 1
    nchw_pad = np.pad(u8, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1)
    nhwc_pad = np.pad(u8.transpose(0, 2, 3, 1), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1)
    one = _const("one", 1.0, np.float32)
    made = {"float Conv (baseline)": (
        _session([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], [numpy_helper.from_array(weight, "W")],
                 TensorProto.FLOAT), {"x": x}, "float")}
    made["QLinearConv u8 x s8, + GreaterOrEqual (threshold layers)"] = (_session(
        [helper.make_node("QLinearConv", ["x", "one", "xz", "W", "one", "wz", "one", "yz", "B"], ["q"], pads=[1, 1, 1, 1]),
         helper.make_node("GreaterOrEqual", ["q", "yz"], ["y"])],
        [numpy_helper.from_array(weight.astype(np.int8), "W"), one, _const("xz", 1, np.uint8), _const("wz", 0, np.int8),
         _const("yz", 128, np.uint8), numpy_helper.from_array(np.zeros(out_c, np.int32), "B")], TensorProto.UINT8),
        {"x": u8}, "signs")
    made["ConvInteger u8 x u8"] = (_session(
        [helper.make_node("ConvInteger", ["x", "W", "xz", "wz"], ["y"], pads=[1, 1, 1, 1])],
        [numpy_helper.from_array((weight + 1).astype(np.uint8), "W"), _const("xz", 1, np.uint8), _const("wz", 1, np.uint8)],
        TensorProto.UINT8), {"x": u8}, "sums")
    nodes, inits = _im2col([1, 2], 3, size)
    nodes.append(helper.make_node("MatMulInteger", ["col", "W", "xz", "wz"], ["y"]))
    inits += [numpy_helper.from_array(weight.transpose(2, 3, 1, 0).reshape(-1, out_c).astype(np.int8), "W"),
              _const("xz", 1, np.uint8), _const("wz", 0, np.int8)]
    made["im2col NHWC + MatMulInteger u8 activations x s8 weights (used)"] = (
        _session(nodes, inits, TensorProto.UINT8), {"x": nhwc_pad}, "sums_nhwc")
    for label, a_type, b_type in (("u8 weights x s8 columns", np.uint8, np.int8), ("s8 weights x u8 columns", np.int8, np.uint8)):
        nodes, inits = _im2col([2, 3], 1, size)
        nodes += [helper.make_node("Reshape", ["col", "shape"], ["flat"]), helper.make_node("MatMulInteger", ["W", "flat", "az", "bz"], ["y"])]
        matrix = weight.transpose(0, 2, 3, 1).reshape(out_c, -1)
        inits += [_const("shape", [1, 9 * in_c, size * size], np.int64),
                  numpy_helper.from_array((matrix + 1).astype(a_type) if a_type == np.uint8 else matrix.astype(a_type), "W"),
                  _const("az", 1 if a_type == np.uint8 else 0, a_type), _const("bz", 0 if b_type == np.int8 else 1, b_type)]
        feed = nchw_pad.astype(np.int8) - 1 if b_type == np.int8 else nchw_pad
        made[f"im2col NCHW + MatMulInteger {label}"] = (_session(nodes, inits, TensorProto.INT8 if b_type == np.int8 else TensorProto.UINT8),
                                                        {"x": feed.astype(b_type)}, "sums_flat")
    return made


def exact(kind: str, got: np.ndarray, sums: np.ndarray) -> bool:
    if kind == "float":
        return True
    if kind == "signs":
        return bool(np.array_equal(got, sums >= 0))
    if kind == "sums_nhwc":
        return bool(np.array_equal(got, sums.transpose(0, 2, 3, 1).astype(np.int32)))
    return bool(np.array_equal(got.reshape(sums.shape), sums.astype(np.int32)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=28)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    c, s = args.channels, args.size
    weight = rng.choice([-1.0, 1.0], size=(c, c, 3, 3)).astype(np.float32)
    x = rng.choice([-1.0, 1.0], size=(1, c, s, s)).astype(np.float32)
    console.print(f"[bold]Integer kernels[/bold] on {machine()}, ONNX Runtime {ort.__version__}: one 3x3 ±1 conv, "
                  f"{c} channels, {s}x{s}, batch 1, 1 thread, median of {args.runs}")
    rows, baseline, sums = [], None, None
    for label, (session, feed, kind) in forms(weight, x, s).items():
        got = session.run(None, feed)[0]
        if sums is None:
            sums = got
        ms = median_ms(lambda: session.run(None, feed), args.runs)
        baseline = baseline or ms
        rows.append([label, f"{ms:.2f}", f"{baseline / ms:.2f}x", "yes" if exact(kind, got, sums) else "NO"])
    table("ONNX Runtime forms of one binary conv (speed-up = float Conv time / this form's time)",
          ["form", "ms", "speed-up", "exact"], rows)
    return 0 if all(r[3] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
