"""QONNX target: export time, file size and validation time, each against a baseline measured in the same run.

    python benchmarks/bench_qonnx.py [--quick]

- **Export**: `htaf_export.export(..., "qonnx", validate_artifact=False)` end to end (load, harden, capture,
  convert) against a bare `torch.onnx.export` of the hardened model (baseline), best of 3.
- **Size**: the file against the 1-bit floor of its binary weights and against the float `onnx` target's file.
  `BipolarQuant` keeps each ±1 weight as a float32 initializer (as Brevitas does); FINN packs weights into the
  accelerator's memories itself, so the file size is not what reaches the FPGA.
- **Validation**: qonnx's executor on the digits (bnn_cnn) or 256 seeded inputs (bnn_resnet), against ONNX
  Runtime running the float `onnx` file on the same inputs (baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import htaf_export  # noqa: E402
from htaf_export.harden import harden  # noqa: E402
from htaf_export.models import build  # noqa: E402
from htaf_export.runtimes import read_artifact  # noqa: E402
from htaf_export.runtimes.qonnx_exec import QonnxRunner  # noqa: E402

from bench_onnx import bare_export  # noqa: E402
from common import ROOT, best_of, console, dump, machine, table  # noqa: E402


def networks(tmp: Path, quick: bool) -> dict[str, Path]:
    torch.manual_seed(0)
    resnet = build("bnn_resnet", {"blocks": [1, 1, 1, 1]} if quick else {}).eval()
    path = tmp / "bnn_resnet.pt"
    htaf_export.save(resnet, path)
    return {"bnn_cnn": ROOT / "sample_models" / "bnn_cnn.pt", "bnn_resnet": path}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    console.print(f"[bold]QONNX target[/bold] on {machine()}")
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for label, path in networks(tmp, args.quick).items():
            loaded = htaf_export.load(path)
            hardened = harden(loaded.module).model
            shape = list(loaded.input_shape)
            quiet = contextlib.redirect_stdout(io.StringIO())
            with quiet:
                ours = best_of(lambda: htaf_export.export(path, "qonnx", tmp / "m.qonnx.onnx", validate_artifact=False))
                htaf_export.export(path, "onnx", tmp / "m.onnx", validate_artifact=False)
            bare = best_of(lambda: bare_export(hardened, shape))
            proto = onnx.load(str(tmp / "m.qonnx.onnx"))
            quantized = {n.input[0] for n in proto.graph.node if n.op_type == "BipolarQuant"}
            floor = sum(int(np.prod(i.dims)) for i in proto.graph.initializer if i.name in quantized) / 8
            size, float_size = (tmp / "m.qonnx.onnx").stat().st_size, (tmp / "m.onnx").stat().st_size
            n = 256
            x = np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)
            runner = QonnxRunner(read_artifact(tmp / "m.qonnx.onnx"))
            start = time.perf_counter()
            for k in range(0, n, 64):
                runner.run({runner.info.input_names[0]: x[k:k + 64]})
            qonnx_s = time.perf_counter() - start
            session = ort.InferenceSession(str(tmp / "m.onnx"), providers=["CPUExecutionProvider"])
            start = time.perf_counter()
            for k in range(0, n, 64):
                session.run(None, {session.get_inputs()[0].name: x[k:k + 64]})
            ort_s = time.perf_counter() - start
            rows.append([label, f"{ours:.2f} s", f"{bare:.2f} s", f"{ours / bare:.2f}x", f"{size:,} B",
                         f"{size / max(floor, 1):.1f}x", f"{size / float_size:.2f}x", f"{qonnx_s:.2f} s",
                         f"{ort_s:.3f} s", f"{qonnx_s / ort_s:.0f}x"])
            records.append({"network": label, "export_s": ours, "bare_s": bare, "size": size, "floor": floor,
                            "float_onnx_size": float_size, "qonnx_exec_s": qonnx_s, "ort_s": ort_s, "inputs": n})
    table("qonnx: export, size, validation (ratios = ours / baseline)",
          ["network", "export", "bare torch.onnx.export", "ratio", "file", "vs 1-bit floor", "vs onnx file",
           "qonnx-exec, 256 inputs", "ORT float file, same inputs", "ratio"], rows)
    dump("qonnx_quick" if args.quick else "qonnx", {"results": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
