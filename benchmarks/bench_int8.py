"""Integer targets: onnx-int8 and tflite-int8 latency against float ONNX Runtime, float TFLite and LCE, one run.

    python benchmarks/bench_int8.py [--quick] [--runs N]

Networks: ``bnn_cnn`` (the sample), the 6-conv stack of ``bench_tflite.py`` (six binary 3x3 convs of 256
channels on 28x28, +1 padding, batch norm and sign between them) and ``bnn_resnet`` (random weights, as in the
other benchmarks). Each goes through the toolchain once per target (no validation: a short parity guard on
4 random inputs against the hardened PyTorch model checks every file that is timed). Latency is the median
of ``--runs`` calls after warm-up at batch 1 and 64, with 1 and 2 threads. The **baselines** of the ratios
are float ONNX Runtime (the ``onnx`` target, whose packed weights are unpacked at session start) and LCE's
faster kernel for ``onnx-int8``, and the stock interpreter (XNNPACK) on ``tflite-float`` for ``tflite-int8``,
measured in the same run. The LCE interpreter runs batch 1 only: batch 64 is 64 calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from htaf_export import harden  # noqa: E402
from htaf_export import io as model_io  # noqa: E402
from htaf_export import metadata as md  # noqa: E402
from htaf_export import pipeline  # noqa: E402
from htaf_export.capture import capture  # noqa: E402
from htaf_export.models import build  # noqa: E402
from htaf_export.reference import run_reference  # noqa: E402
from htaf_export.targets import TARGETS, ExportOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tflite import build_network, check_parity, time_lce  # noqa: E402
from common import ROOT, console, dump, machine, median_ms, stock_tflite, table  # noqa: E402

TARGET_NAMES = ("onnx", "onnx-int8", "tflite-float", "tflite-int8", "tflite")


def networks(quick: bool) -> dict[str, tuple[torch.nn.Module, list[int]]]:
    cnn = model_io.load(ROOT / "sample_models" / "bnn_cnn.pt")
    torch.manual_seed(0)
    resnet = build("bnn_resnet", {"blocks": [1, 1, 1, 1]} if quick else {}).eval()
    return {"bnn_cnn": (cnn.module.eval(), list(cnn.input_shape or [1, 8, 8])),
            "6-conv stack": (build_network(6, 64 if quick else 256, 28), [64 if quick else 256, 28, 28]),
            "bnn_resnet": (resnet, list(resnet.input_shape))}


def convert_all(model: torch.nn.Module, shape: list[int]) -> tuple[dict[str, bytes], torch.nn.Module]:
    hardened = harden(model).model
    cap = capture(hardened, shape, ["output"])
    files = {t: pipeline.convert(cap, TARGETS[t], {md.TARGET: t}, ExportOptions(), hardened).data for t in TARGET_NAMES}
    return files, hardened


def ort_session(data: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def parity(files: dict[str, bytes], hardened: torch.nn.Module, shape: list[int]) -> str:
    """The guard: each ONNX file's output against the hardened model on 4 random inputs. Only onnx-int8 gets a
    verdict: in the float file ONNX Runtime fuses batch norms into convs, so a deep network's float steps can
    flip within their rounding bounds and the difference grows downstream (validation explains those flips)."""
    x = np.random.default_rng(1).standard_normal((4, *shape)).astype(np.float32)
    ref = run_reference(hardened, (torch.from_numpy(x),), ["output"]).outputs["output"]
    parts = []
    for t in ("onnx", "onnx-int8"):
        session = ort_session(files[t], 1)
        got = session.run(["output"], {session.get_inputs()[0].name: x})[0]
        err = float(np.abs(got - ref).max())
        verdict = "ok" if err <= 1e-3 * (1 + np.abs(ref).max()) else "MISMATCH"
        parts.append(f"{t} max error {err:.1e}" + (f" ({verdict})" if t == "onnx-int8" else ""))
    return ", ".join(parts)


def time_ort(data: bytes, shape: list[int], batch: int, threads: int, runs: int) -> float:
    session = ort_session(data, threads)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)}
    return median_ms(lambda: session.run(None, feed), runs)


def time_stock_tflite(data: bytes, batch: int, threads: int, runs: int) -> float:
    return median_ms(stock_tflite(data, threads, batch).invoke, runs)


def measure(files: dict[str, bytes], shape: list[int], batch: int, threads: int, runs: int) -> dict[str, float]:
    lce_runs = max(3, runs // 3) if batch == 1 else 1
    times = {"onnx-int8": time_ort(files["onnx-int8"], shape, batch, threads, runs),
             "onnx (float ORT)": time_ort(files["onnx"], shape, batch, threads, runs),
             "tflite-float (XNNPACK)": time_stock_tflite(files["tflite-float"], batch, threads, runs),
             "tflite-int8 (XNNPACK)": time_stock_tflite(files["tflite-int8"], batch, threads, runs)}
    for kernel in ("default", "indirect_bgemm"):
        one = time_lce(files["tflite"], kernel, threads, lce_runs) if batch == 1 else None
        times[f"LCE {kernel}"] = one if one is not None else _lce_batch(files["tflite"], kernel, threads, batch)
    return times


def _lce_batch(data: bytes, kernel: str, threads: int, batch: int) -> float:
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    from htaf_export.runtimes import tflite as rt

    it = Interpreter(data, num_threads=threads, **rt.LCE_KERNELS[kernel])
    x = [np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in it.input_shapes]
    it.interpreter.predict(x)
    start = time.perf_counter()
    for _ in range(batch):
        it.interpreter.predict(x)
    return 1000 * (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller networks, fewer runs (a smoke test)")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 20)
    torch.set_num_threads(2)
    console.print(f"[bold]Integer target[/bold] on {machine()}, ONNX Runtime {ort.__version__}, median of {runs} runs")
    rows, records = [], []
    for label, (model, shape) in networks(args.quick).items():
        files, hardened = convert_all(model, shape)
        console.print(f"{label} {shape}: parity guard: {parity(files, hardened, shape)}; tflite-int8 "
                      f"{check_parity(model, files['tflite-int8'])}; sizes: " +
                      ", ".join(f"{t} {len(d) / 1024:.0f} KiB" for t, d in files.items()))
        for batch in (1, 64):
            for threads in (1, 2):
                times = measure(files, shape, batch, threads, runs if batch == 1 else max(3, runs // 4))
                best_lce = min(times["LCE default"], times["LCE indirect_bgemm"])
                int8 = times["onnx-int8"]
                rows.append([label, batch, threads, *(f"{v:.2f}" for v in times.values()),
                             f"{times['onnx (float ORT)'] / int8:.2f}x", f"{best_lce / int8:.2f}x",
                             f"{times['tflite-float (XNNPACK)'] / times['tflite-int8 (XNNPACK)']:.2f}x"])
                records.append({"network": label, "batch": batch, "threads": threads, "ms": times})
    columns = ["network", "batch", "threads", "onnx-int8 ms", "onnx (float ORT) ms", "tflite-float (XNNPACK) ms",
               "tflite-int8 (XNNPACK) ms", "LCE default ms", "LCE indirect_bgemm ms", "onnx-int8 vs float ORT",
               "onnx-int8 vs faster LCE", "tflite-int8 vs tflite-float"]
    table("Integer targets against the float and bit-packed ones (speed-up = baseline time / integer time)",
          columns, rows)
    dump("int8_quick" if args.quick else "int8", {"machine": machine(), "runs": runs, "results": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
