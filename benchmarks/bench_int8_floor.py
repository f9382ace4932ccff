"""How far onnx-int8 is from its floor on bnn_resnet: the integer products alone, against the whole file.

    python benchmarks/bench_int8_floor.py [--runs N]

bnn_resnet (random weights, as in the other benchmarks) is exported to ``onnx`` and ``onnx-int8``. Measured in
one run, batch 1, one thread, median of ``--runs``: the float file (the **baseline**), the onnx-int8 file, and
each of its ``MatMulInteger`` products run alone (a one-node session fed the very columns the file computes
for one input), summed. The products are the work no formulation with standard ONNX ops avoids, so
baseline / products bounds what onnx-int8 can reach on this machine, and the rest (im2col copies, padding,
steps, the float scale and residual adds, the float stem and shortcuts) is what an ideal graph would remove.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnx import helper  # noqa: E402

from htaf_export import harden  # noqa: E402
from htaf_export import metadata as md  # noqa: E402
from htaf_export import pipeline  # noqa: E402
from htaf_export.capture import capture  # noqa: E402
from htaf_export.models import build  # noqa: E402
from htaf_export.targets import TARGETS, ExportOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import console, dump, machine, median_ms, table  # noqa: E402


def session(model: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def products(int8: bytes, x: np.ndarray) -> list[tuple[bytes, np.ndarray]]:
    """(one-node model, its column input for ``x``) for every MatMulInteger of the file; weights unpacked."""
    proto = onnx.load_from_string(int8)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulInteger"]
    wanted = [name for n in nodes for name in n.input[:2]]
    exposed = onnx.load_from_string(int8)
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in wanted)
    got = dict(zip(wanted, session(exposed.SerializeToString()).run(wanted, {"input": x})))
    made = []
    for n in nodes:
        zero_points = {i.name: i for i in proto.graph.initializer if i.name in n.input[2:]}
        weight = onnx.numpy_helper.from_array(got[n.input[1]], "W")
        one = helper.make_node("MatMulInteger", ["A", "W", *n.input[2:]], ["Y"])
        graph = helper.make_graph([one], "product", [helper.make_tensor_value_info("A", onnx.TensorProto.UINT8, None)],
                                  [helper.make_tensor_value_info("Y", onnx.TensorProto.INT32, None)],
                                  [weight, *zero_points.values()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        made.append((model.SerializeToString(), got[n.input[0]]))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    resnet = build("bnn_resnet", {}).eval()
    hardened = harden(resnet).model
    cap = capture(hardened, list(resnet.input_shape), ["output"])
    files = {t: pipeline.convert(cap, TARGETS[t], {md.TARGET: t}, ExportOptions(), hardened).data for t in ("onnx", "onnx-int8")}
    x = np.random.default_rng(1).standard_normal((1, *resnet.input_shape)).astype(np.float32)
    ms = {}
    for target, data in files.items():
        s = session(data)
        ms[target] = median_ms(lambda: s.run(None, {"input": x}), args.runs)
    alone = 0.0
    for model, column in products(files["onnx-int8"], x):
        s = session(model)
        alone += median_ms(lambda: s.run(None, {"A": column}), args.runs)
    console.print(f"machine: {machine()}, ONNX Runtime {ort.__version__}")
    base = ms["onnx"]
    table("bnn_resnet at batch 1, one thread (ratio = float ONNX Runtime time / this time)",
          ["what runs", "ms", "ratio"],
          [["float ONNX Runtime (onnx target), the baseline", f"{base:.2f}", "1.00x"],
           ["onnx-int8, whole file", f"{ms['onnx-int8']:.2f}", f"{base / ms['onnx-int8']:.2f}x"],
           ["its 16 MatMulInteger products alone (the floor)", f"{alone:.2f}", f"{base / alone:.2f}x"],
           ["3.5x would need the whole file in", f"{base / 3.5:.2f}", "3.50x"]])
    dump("int8_floor", {"float_ms": base, "int8_ms": ms["onnx-int8"], "products_ms": alone})


if __name__ == "__main__":
    main()
