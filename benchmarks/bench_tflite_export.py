"""TFLite targets end to end: export overhead, size, inference, scaling and memory, each against a baseline
measured in this run.

    python benchmarks/bench_tflite_export.py [--quick]

Baselines:
- export: ``larq_compute_engine.convert_keras_model`` on an equivalent Keras + larq model written by hand
  (what a larq user runs without htaf-export; the model is built before the clock starts), against
  htaf-export's load + harden + capture + convert (``--no-validate``) and the full command with validation.
  ``tflite-float`` is compared with ``tf.lite.TFLiteConverter.from_keras_model`` on the same hand-built model.
  The hand-built models match ours in layers, shapes and weight counts (random weights; Keras pads a
  stride-2 "same" conv on one side only, PyTorch on both: the same cost);
- size: the 1-bit floor of the binary weights plus 4 bytes per float parameter (as in bench_onnx.py);
- inference: the ``tflite-float`` build of the same network on the same runtime (the LCE interpreter, which
  runs builtin ops too), and the stock TFLite interpreter (XNNPACK on) as users run float files.
  LCE's Python interpreter runs one sample at a time (its ``predict`` loops over the batch), so its batch-N
  time is N batch-1 calls; stock TFLite resizes the input and runs the batch in one invocation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import htaf_export  # noqa: E402
from htaf_export.models import build  # noqa: E402
from htaf_export import metadata as md  # noqa: E402
from htaf_export import tflite_file as tfl  # noqa: E402
from htaf_export.runtimes import tflite as rt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Timers, best_of, console, dump, machine, peak_rss_mib, stock_tflite, table, verdict, plot_scaling  # noqa: E402

BATCH = 64
THREADS = 2
RESNET_QUICK = {"blocks": [2, 2, 2, 2]}


# The TFLite converter, loaded up front so that the memory baseline (imports only) includes it; then the
# hand-built models and bare converters.
import htaf_export.converters.tflite  # noqa: E402,F401
from keras_models import bare_lce, bare_tflite, keras_bnn_cnn, keras_bnn_resnet, quiet  # noqa: E402


# ---- networks ----------------------------------------------------------------------------------


def networks(tmp: Path, quick: bool) -> list[dict]:
    cnn = htaf_export.load(ROOT / "sample_models" / "bnn_cnn.pt").module
    nets = [{"label": "bnn_cnn (sample)", "path": ROOT / "sample_models" / "bnn_cnn.pt", "keras": keras_bnn_cnn,
             "module": cnn}]
    torch.manual_seed(0)
    resnet = build("bnn_resnet", RESNET_QUICK if quick else {}).eval()
    path = tmp / "bnn_resnet.pt"
    htaf_export.save(resnet, path)
    blocks = tuple(resnet.config["blocks"])
    nets.append({"label": f"bnn_resnet ({sum(p.numel() for p in resnet.parameters()) / 1e6:.1f} M weights)",
                 "path": path, "keras": lambda: keras_bnn_resnet(blocks=blocks), "module": resnet})
    return nets


def run_export(path: Path, target: str, out: Path, validate: bool = False):
    with quiet():
        return htaf_export.export(path, target, out, validate_artifact=validate)


def best_export(path: Path, target: str, out: Path, repeat: int = 3):
    """Best of ``repeat`` exports without validation: (seconds, the ExportResult of that run)."""
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run_export(path, target, out)
        took = time.perf_counter() - start
        if best is None or took < best[0]:
            best = (took, result)
    return best


# ---- 1. export overhead ------------------------------------------------------------------------


def export_overhead(nets: list[dict], tmp: Path, quick: bool) -> list[dict]:
    rows = []
    for net in nets:
        start = time.perf_counter()
        with quiet():
            model = net["keras"]()
        build_s = time.perf_counter() - start
        net["keras_model"] = model
        net["hand"] = bare_lce(model)  # also the warm-up: TF's first trace and save pay one-off costs
        run_export(net["path"], "tflite", tmp / "warm.tflite")
        bare = best_of(lambda: bare_lce(model))
        ours, result = best_export(net["path"], "tflite", tmp / "ours.tflite")
        repeat = 1 if quick else 2
        bare_fl = best_of(lambda: bare_tflite(model), repeat=repeat + 1)
        ours_fl, result_fl = best_export(net["path"], "tflite-float", tmp / "ours.float.tflite", repeat=repeat + 1)
        start = time.perf_counter()
        full = run_export(net["path"], "tflite", tmp / "full.tflite", validate=True)
        full_s = time.perf_counter() - start
        report = full.report
        net.update(tflite=result.conversion.data, tflite_float=result_fl.conversion.data, result=result)
        rows.append({"network": net["label"], "keras_build_s": build_s, "bare_s": bare, "ours_s": ours,
                     "overhead": ours / bare, "stages": result.seconds, "bare_float_s": bare_fl,
                     "ours_float_s": ours_fl, "float_overhead": ours_fl / bare_fl, "full_s": full_s,
                     "full_stages": full.seconds, "with_validation": full_s / bare, "verdict": verdict(report),
                     "backends": [b.backend for b in report.backends]})
    table("Export time vs bare larq_compute_engine.convert_keras_model on a hand-built Keras+larq model (best of 3)",
          ["network", "bare convert_keras_model", "htaf-export --target tflite --no-validate", "ratio (goal ≤ 1.5)",
           "with validation", "ratio"],
          [[r["network"], f"{r['bare_s']:.2f} s", f"{r['ours_s']:.2f} s", f"{r['overhead']:.2f}x",
            f"{r['full_s']:.1f} s", f"{r['with_validation']:.1f}x"] for r in rows])
    table(f"Export time, float build: vs tf.lite.TFLiteConverter.from_keras_model on the same hand-built model "
          f"(best of {1 if quick else 2})",
          ["network", "bare TFLiteConverter", "htaf-export --target tflite-float --no-validate", "ratio (goal ≤ 1.5)"],
          [[r["network"], f"{r['bare_float_s']:.2f} s", f"{r['ours_float_s']:.2f} s", f"{r['float_overhead']:.2f}x"]
           for r in rows])
    table("Where htaf-export --target tflite spends its time (stages of the best run; validation from the full run)",
          ["network", "load", "harden", "capture", "convert", "validate", "validated on"],
          [[r["network"], *[f"{r['stages'][k]:.2f} s" for k in ("load", "harden", "capture", "convert")],
            f"{r['full_stages'].get('validate', 0):.1f} s",
            f"{', '.join(r['backends'])}: {r['verdict']}"] for r in rows])
    console.print("Keras model build by hand (not timed in the baseline): " +
                  ", ".join(f"{r['network']} {r['keras_build_s']:.2f} s" for r in rows))
    return rows


# ---- where the convert stage spends its time ---------------------------------------------------


def convert_breakdown(nets: list[dict], tmp: Path) -> list[dict]:
    """One instrumented export per network (not the timed runs): the convert stage split into its steps, and
    convert_keras_model split into its Keras SavedModel save and its MLIR conversion."""
    import larq_compute_engine as lce
    from larq_compute_engine.mlir.python import converter as lce_converter

    from htaf_export import pipeline
    from htaf_export.converters import keras_builder
    from htaf_export.converters import tflite as conv
    from htaf_export.runtimes import tflite_locate as locate

    tf = tfl.tensorflow()
    rows = []
    for net in nets:
        timers = Timers()
        timers.wrap(keras_builder.KerasBuilder, "build", "Keras model build (IR → tf_keras layers)")
        timers.wrap(tf.saved_model, "save", "SavedModel save (weights only)")
        timers.wrap(lce, "convert_saved_model", "LCE MLIR conversion (convert_saved_model)")
        timers.wrap(conv, "_to_tflite", "_to_tflite")
        # the runtime stage (runtimes.tflite_locate), run by pipeline.convert after the converter
        timers.wrap(pipeline, "step_oracle", "oracle set-up",
                    wrap_result=timers.timed_fn("locate steps: oracle (hardened PyTorch model on the probes)"))
        timers.wrap(locate, "_runner", "locate steps: LCE interpreter load",
                    wrap_result=timers.timed_fn("locate steps: LCE interpreter runs"))
        timers.wrap(locate, "locate_steps", "locate_steps")
        # tflite_locate imported time_kernels by name: wrap the name it calls
        timers.wrap(locate, "time_kernels", "LCE kernel timing (both kernels, for the export summary only)")
        timers.wrap(tfl, "with_metadata", "metadata into the flatbuffer (converter + runtime stage)")
        try:
            result = run_export(net["path"], "tflite", tmp / "breakdown.tflite")
        finally:
            timers.restore()
        s = dict(timers.seconds)
        convert_s = result.seconds["convert"]
        trace = s.pop("_to_tflite") - s["SavedModel save (weights only)"] - s["LCE MLIR conversion (convert_saved_model)"]
        locate_s = s.pop("locate_steps")
        s.pop("oracle set-up")
        probe_parts = (s["locate steps: oracle (hardened PyTorch model on the probes)"] +
                       s["locate steps: LCE interpreter load"] + s["locate steps: LCE interpreter runs"])
        parts = {"capture: torch.onnx.export (dynamo) + IR cleanup": result.seconds["capture"],
                 "load + harden": result.seconds["load"] + result.seconds["harden"],
                 "tf.function trace of the Keras model": trace, **s,
                 "locate steps: candidates, decode + compare (numpy)": locate_s - probe_parts}
        parts["convert: the rest (IR copy, binary fusion, BN folding, checks, summary)"] = \
            convert_s - sum(v for k, v in parts.items() if not k.startswith(("capture", "load")))
        total = sum(result.seconds[k] for k in ("load", "harden", "capture", "convert"))

        # the bare converter, split the same way
        bare = Timers()
        model = net["keras_model"]
        bare.wrap(lce_converter, "convert_saved_model", "MLIR conversion")
        try:
            start = time.perf_counter()
            bare_lce(model)
            bare_total = time.perf_counter() - start
        finally:
            bare.restore()
        bare_parts = {"Keras model.save (SavedModel with layer state)": bare_total - bare.seconds["MLIR conversion"],
                      "LCE MLIR conversion (convert_saved_model)": bare.seconds["MLIR conversion"]}
        rows.append({"network": net["label"], "total_s": total, "parts": parts, "bare_total_s": bare_total,
                     "bare_parts": bare_parts})
        table(f"{net['label']}: htaf-export --target tflite --no-validate, {total:.2f} s (instrumented run), "
              f"against convert_keras_model, {bare_total:.2f} s",
              ["step", "seconds", "share"],
              [[k, f"{v:.3f}", f"{100 * v / total:.0f}%"] for k, v in parts.items()] +
              [[f"bare convert_keras_model: {k}", f"{v:.3f}", ""] for k, v in bare_parts.items()])
    return rows


# ---- 2. size -----------------------------------------------------------------------------------


def size(nets: list[dict]) -> list[dict]:
    rows = []
    for net in nets:
        hardened = htaf_export.harden(net["module"]).model
        binary = 8 * net["result"].conversion.binary_floor_bytes  # ±1 weights of every binary layer
        floats = sum(t.numel() for t in hardened.state_dict().values() if torch.is_tensor(t)
                     and t.is_floating_point()) - binary
        floor = binary / 8 + 4 * floats
        meta = tfl.read_metadata(tfl.read_model(net["tflite"]))
        rows.append({"network": net["label"], "tflite": len(net["tflite"]), "tflite_float": len(net["tflite_float"]),
                     "hand": len(net["hand"]), "floor": floor, "binary_floor": binary / 8,
                     "metadata": len(md.compact(meta))})
    table("TFLite size vs floor (1 bit per binary weight + 4 B per float parameter, BN statistics included)",
          ["network", "tflite (bit-packed)", "tflite / floor", "of which htaf metadata", "tflite-float",
           "float / floor", "hand-built Keras+LCE", "tflite / hand-built"],
          [[r["network"], f"{r['tflite']:,} B", f"{r['tflite'] / r['floor']:.3f}x", f"{r['metadata']:,} B",
            f"{r['tflite_float']:,} B",
            f"{r['tflite_float'] / r['floor']:.2f}x", f"{r['hand']:,} B", f"{r['tflite'] / r['hand']:.3f}x"]
           for r in rows])
    console.print("floors: " + ", ".join(f"{r['network']} {r['floor']:,.0f} B (binary weights {r['binary_floor']:,.0f} B)"
                                         for r in rows))
    return rows


# ---- 3. inference ------------------------------------------------------------------------------


def _lce_timer(data: bytes, kernel: str | None, batch: int, repeat: int) -> float:
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    it = Interpreter(data, num_threads=THREADS, **(rt.LCE_KERNELS[kernel] if kernel else {}))
    x = [np.random.default_rng(0).standard_normal((batch, *s[1:])).astype(np.float32) for s in it.input_shapes]
    it.predict(x)  # warm-up
    return 1000 * best_of(lambda: it.predict(x), repeat=repeat)


def _stock_timer(data: bytes, batch: int, repeat: int) -> float:
    it = stock_tflite(data, THREADS, batch)
    it.invoke()  # warm-up
    return 1000 * best_of(it.invoke, repeat=repeat)


def inference(nets: list[dict], quick: bool) -> list[dict]:
    rows = []
    for net in nets:
        row = {"network": net["label"]}
        for batch in (1, BATCH):
            repeat = 10 if batch == 1 else (2 if quick else 3)
            row[f"lce_default_b{batch}"] = _lce_timer(net["tflite"], "default", batch, repeat)
            row[f"lce_indirect_b{batch}"] = _lce_timer(net["tflite"], "indirect_bgemm", batch, repeat)
            row[f"lce_float_b{batch}"] = _lce_timer(net["tflite_float"], None, batch, repeat)
            row[f"stock_float_b{batch}"] = _stock_timer(net["tflite_float"], batch, repeat)
            row[f"hand_indirect_b{batch}"] = _lce_timer(net["hand"], "indirect_bgemm", batch, repeat)
        row["chosen"] = tfl.read_metadata(tfl.read_model(net["tflite"])).get(md.TFLITE_LCE_KERNEL, "?")
        rows.append(row)
    for batch in (1, BATCH):
        table(f"TFLite latency at batch {batch}, {THREADS} threads (best of {10 if batch == 1 else 3}); "
              f"ratio = float build on the same runtime / this (above 1: the bit-packed file is faster)"
              + ("; LCE runs the batch one sample at a time" if batch > 1 else ""),
              ["network", "LCE default kernel", "ratio", "LCE indirect_bgemm", "ratio",
               "float file on LCE interpreter", "float file on stock TFLite (XNNPACK)", "indirect vs stock",
               "hand-built Keras+LCE, indirect"],
              [[r["network"], f"{r[f'lce_default_b{batch}']:.2f} ms",
                f"{r[f'lce_float_b{batch}'] / r[f'lce_default_b{batch}']:.2f}x",
                f"{r[f'lce_indirect_b{batch}']:.2f} ms",
                f"{r[f'lce_float_b{batch}'] / r[f'lce_indirect_b{batch}']:.2f}x",
                f"{r[f'lce_float_b{batch}']:.2f} ms", f"{r[f'stock_float_b{batch}']:.2f} ms",
                f"{r[f'stock_float_b{batch}'] / r[f'lce_indirect_b{batch}']:.2f}x",
                f"{r[f'hand_indirect_b{batch}']:.2f} ms"] for r in rows])
    console.print("LCE kernel recommended in the file (--lce-kernel auto, a fixed rule): " +
                  ", ".join(f"{r['network']} {r['chosen']}" for r in rows))
    return rows


# ---- 4. scaling --------------------------------------------------------------------------------


def scaling(tmp: Path, quick: bool) -> list[dict]:
    sizes = [(128, 2), (256, 3), (512, 4), (1024, 6)] if not quick else [(64, 2), (128, 2), (256, 3), (512, 3)]
    rows = []
    for width, depth in sizes:
        torch.manual_seed(0)
        model = build("bnn_mlp", {"hidden": [width] * depth}).eval()
        path = tmp / f"mlp_{width}x{depth}.pt"
        htaf_export.save(model, path)
        run_export(path, "tflite", tmp / "scale.tflite")  # warm-up for this graph's shapes
        export_s, _ = best_export(path, "tflite", tmp / "scale.tflite", repeat=1 if quick else 2)
        result = run_export(path, "tflite", tmp / "scale.tflite", validate=True)
        report = result.report
        rows.append({"width": width, "depth": depth, "weights": sum(p.numel() for p in model.parameters()),
                     "export_s": export_s, "convert_s": result.seconds["convert"],
                     "validate_s": result.seconds["validate"],
                     "samples": report.backends[0].samples if report else 0,
                     "runners": len(report.backends) if report else 0, "passed": bool(report and report.passed)})
    table("Scaling: bnn_mlp to --target tflite; export (best of 2, no validation) and validation on digits "
          "(1,797 + crafted inputs, both LCE kernels)",
          ["width x depth", "weights", "export", "of which convert", "validation", "validation per 1k inputs",
           "parity"],
          [[f"{r['width']} x {r['depth']}", f"{r['weights']:,}", f"{r['export_s']:.2f} s", f"{r['convert_s']:.2f} s",
            f"{r['validate_s']:.2f} s", f"{1000 * r['validate_s'] / max(r['samples'], 1):.2f} s",
            "pass" if r["passed"] else "FAIL"] for r in rows])
    # --quick runs are smoke tests: their plot goes to results/ (not committed), not over the published one
    plot_scaling(rows, [("export_s", "o-", "export (no validation)"), ("convert_s", "^--", "of which convert"),
                  ("validate_s", "s-", "validation (both LCE kernels)")],
                 "htaf-export --target tflite, bnn_mlp of growing size",
                 ROOT / "benchmarks" / ("results/scaling_tflite_quick.png" if quick else "scaling_tflite.png"))
    return rows


# ---- 5. memory ---------------------------------------------------------------------------------


def memory(tmp: Path, nets: list[dict], quick: bool) -> list[dict]:
    resnet = nets[-1]["path"]
    rng = np.random.default_rng(0)
    for n in (1_000, 10_000):
        np.savez(tmp / f"inputs_{n}.npz", x=rng.random((n, 64), dtype=np.float32))
    blocks = list(RESNET_QUICK["blocks"]) if quick else [4, 4, 4, 4]
    imports = ("import sys; sys.path.insert(0, 'benchmarks')\nimport bench_tflite_export as B\nimport htaf_export\n"
               "import larq, larq_compute_engine\n")
    rows = [
        {"what": "imports only, TensorFlow + larq + LCE included (baseline)", "mib": peak_rss_mib(imports)},
        {"what": "bare convert_keras_model, hand-built bnn_resnet",
         "mib": peak_rss_mib(imports + f"B.bare_lce(B.keras_bnn_resnet(blocks={blocks}))")},
        {"what": "htaf-export --target tflite --no-validate, bnn_resnet",
         "mib": peak_rss_mib(imports + f"B.run_export(B.Path('{resnet}'), 'tflite', B.Path('{tmp}/m.tflite'))")},
    ]
    for n in (1_000, 10_000):
        rows.append({"what": f"htaf-export --target tflite, validation of bnn_mlp over {n:,} inputs",
                     "mib": peak_rss_mib(imports + f"r = htaf_export.export('sample_models/bnn_mlp.pt', 'tflite', "
                                                   f"'{tmp}/v.tflite', data=B.Path('{tmp}/inputs_{n}.npz'))\n"
                                                   f"assert r.report.backends[0].samples >= {n}")})
    base = rows[0]["mib"]
    table("Peak resident memory, TFLite (child process)", ["run", "peak", "above imports"],
          [[r["what"], f"{r['mib']:.0f} MiB", f"{r['mib'] - base:+.0f} MiB"] for r in rows])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller networks and fewer repeats, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    console.print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        nets = networks(tmp, args.quick)
        results = {"export": export_overhead(nets, tmp, args.quick), "breakdown": convert_breakdown(nets, tmp),
                   "size": size(nets), "inference": inference(nets, args.quick),
                   "scaling": scaling(tmp, args.quick), "memory": memory(tmp, nets, args.quick)}
    dump("tflite_export", results)


if __name__ == "__main__":
    main()
