"""ONNX target: export overhead, size, inference and scaling, each against a baseline measured in this run.

    python benchmarks/bench_onnx.py [--quick]

Baselines:
- export: bare ``torch.onnx.export(dynamo=True)`` of the same hardened network (what a user would run
  without htaf-export), against htaf-export's harden + capture + convert + write, and the full
  command including parity validation;
- size: the 1-bit floor of the binary weights plus 4 bytes per float parameter;
- inference: the same network stored with float32 weights (no bit packing), on the same runtime.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import htaf_export
from htaf_export.capture import capture
from htaf_export.converters.onnx import build as build_onnx
from htaf_export.models import build

from common import ROOT, Timers, best_of, console, dump, machine, peak_rss_mib, table, verdict, plot_scaling

warnings.filterwarnings("ignore")


def bare_export(model: torch.nn.Module, shape: list[int]) -> bytes:
    import contextlib
    import logging

    logging.disable(logging.WARNING)
    buf = io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (torch.zeros(2, *shape),), dynamo=True, report=False, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        program.save(buf)  # type: ignore[union-attr]
    return buf.getvalue()


def networks(tmp: Path, quick: bool) -> dict[str, Path]:
    nets = {"bnn_cnn (sample)": ROOT / "sample_models" / "bnn_cnn.pt"}
    torch.manual_seed(0)
    resnet = build("bnn_resnet", {"blocks": [2, 2, 2, 2]} if quick else {})
    resnet.eval()
    path = tmp / "bnn_resnet.pt"
    htaf_export.save(resnet, path)
    nets[f"bnn_resnet ({sum(p.numel() for p in resnet.parameters()) / 1e6:.1f} M weights)"] = path
    return nets


def export_overhead(nets: dict[str, Path], tmp: Path) -> list[dict]:
    rows = []
    for label, path in nets.items():
        loaded = htaf_export.load(path)
        hardened = htaf_export.harden(loaded.module).model
        bare_export(hardened, loaded.input_shape)  # warm up the exporter once
        bare = best_of(lambda: bare_export(hardened, loaded.input_shape))
        out = tmp / "ours.onnx"
        ours = best_of(lambda: htaf_export.export(path, "onnx", out, validate_artifact=False))
        start = time.perf_counter()
        result = htaf_export.export(path, "onnx", out)
        full = time.perf_counter() - start
        rows.append({"network": label, "bare_s": bare, "ours_s": ours, "ours_validated_s": full,
                     "overhead": ours / bare, "with_validation": full / bare, "parity": verdict(result.report)})
    table("Export time vs bare torch.onnx.export (best of 3)",
          ["network", "bare torch.onnx.export", "htaf-export --no-validate", "ratio (goal ≤ 1.5)",
           "htaf-export with validation", "ratio", "parity (default tolerance)"],
          [[r["network"], f"{r['bare_s']:.2f} s", f"{r['ours_s']:.2f} s", f"{r['overhead']:.2f}x",
            f"{r['ours_validated_s']:.2f} s", f"{r['with_validation']:.2f}x", r["parity"]] for r in rows])
    return rows


def breakdown(nets: dict[str, Path], tmp: Path) -> list[dict]:
    """One instrumented export per network (not the timed runs): where htaf-export --target onnx spends its time."""
    import onnx

    from htaf_export.converters import onnx as conv

    rows = []
    for label, path in nets.items():
        timers = Timers()
        timers.wrap(torch.onnx, "export", "torch.onnx.export (dynamo, optimize=False)")
        timers.wrap(conv, "build", "build")
        timers.wrap(onnx.checker, "check_model", "convert: onnx.checker.check_model(full_check=True)")
        timers.wrap(conv.OnnxBuild, "serialized", "convert: serialize")
        try:
            result = htaf_export.export(path, "onnx", tmp / "breakdown.onnx", validate_artifact=False)
        finally:
            timers.restore()
        s, t = dict(timers.seconds), result.seconds
        exporter = s.pop("torch.onnx.export (dynamo, optimize=False)")
        built = s.pop("build")
        checker = s["convert: onnx.checker.check_model(full_check=True)"]
        parts = {"load": t["load"], "harden": t["harden"], "capture: torch.onnx.export (dynamo, optimize=False)": exporter,
                 "capture: IR passes (fold constants, lift steps, name steps, cleanup)": t["capture"] - exporter,
                 "convert: build (IR copy, BN folding, 1-bit packing, cleanup, step functions, metadata)":
                     built - checker,
                 **s, "convert: the rest (export summary)": t["convert"] - built - s["convert: serialize"]}
        total = sum(t[k] for k in ("load", "harden", "capture", "convert"))
        loaded = htaf_export.load(path)
        hardened = htaf_export.harden(loaded.module).model
        bare = best_of(lambda: bare_export(hardened, loaded.input_shape), repeat=1)
        rows.append({"network": label, "total_s": total, "parts": parts, "bare_s": bare})
        table(f"{label}: htaf-export --target onnx --no-validate, {total:.2f} s (instrumented run); "
              f"bare torch.onnx.export (default optimize=True, + save) {bare:.2f} s",
              ["step", "seconds", "share"], [[k, f"{v:.3f}", f"{100 * v / total:.0f}%"] for k, v in parts.items()])
    return rows


def size_and_inference(nets: dict[str, Path]) -> list[dict]:
    rows = []
    for label, path in nets.items():
        loaded = htaf_export.load(path)
        hardened = htaf_export.harden(loaded.module).model
        cap = capture(hardened, loaded.input_shape, loaded.output_names)
        packed = build_onnx(cap, {})
        plain = build_onnx(cap, {}, pack_weights=False)
        binary = sum(p.numel for p in packed.packed)
        floats = sum(t.numel() for t in hardened.state_dict().values() if torch.is_tensor(t)
                     and t.is_floating_point()) - binary
        floor = binary / 8 + 4 * floats
        size = len(packed.serialized())
        row = {"network": label, "bytes": size, "float_bytes": len(plain.serialized()), "floor_bytes": floor,
               "binary_ratio": packed.binary_stored_bytes / max(packed.binary_floor_bytes, 1)}
        for batch in (1, 64):
            x = np.random.default_rng(0).standard_normal((batch, *loaded.input_shape)).astype(np.float32)
            for key, art in (("packed", packed), ("float", plain)):
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 2
                sess = ort.InferenceSession(art.serialized(), opts, providers=["CPUExecutionProvider"])
                sess.run(None, {"input": x})
                row[f"{key}_ms_b{batch}"] = 1000 * best_of(lambda: sess.run(None, {"input": x}), repeat=10)
        rows.append(row)
    table("Artifact size vs floor (1 bit per binary weight + 4 B per float parameter)",
          ["network", "ONNX (packed)", "same, float32 weights", "floor", "packed / floor", "binary weights / 1-bit floor"],
          [[r["network"], f"{r['bytes']:,} B", f"{r['float_bytes']:,} B", f"{r['floor_bytes']:,.0f} B",
            f"{r['bytes'] / r['floor_bytes']:.3f}x", f"{r['binary_ratio']:.3f}x"] for r in rows])
    table("ONNX Runtime CPU latency, 2 threads (best of 10): packed 1-bit file vs float32-weight file",
          ["network", "batch 1 packed", "batch 1 float", "ratio", "batch 64 packed", "batch 64 float", "ratio"],
          [[r["network"], f"{r['packed_ms_b1']:.2f} ms", f"{r['float_ms_b1']:.2f} ms",
            f"{r['packed_ms_b1'] / r['float_ms_b1']:.2f}x", f"{r['packed_ms_b64']:.2f} ms",
            f"{r['float_ms_b64']:.2f} ms", f"{r['packed_ms_b64'] / r['float_ms_b64']:.2f}x"] for r in rows])
    return rows


def scaling(tmp: Path, quick: bool) -> list[dict]:
    sizes = [(128, 2), (256, 3), (512, 4), (1024, 6)] if not quick else [(64, 2), (128, 2), (256, 3), (512, 3)]
    rows = []
    for width, depth in sizes:
        torch.manual_seed(0)
        model = build("bnn_mlp", {"hidden": [width] * depth}).eval()
        path = tmp / f"mlp_{width}x{depth}.pt"
        htaf_export.save(model, path)
        export_s = best_of(lambda: htaf_export.export(path, "onnx", tmp / "scale.onnx", validate_artifact=False),
                           repeat=1 if quick else 2)
        result = htaf_export.export(path, "onnx", tmp / "scale.onnx")
        s = result.seconds
        rows.append({"width": width, "depth": depth, "weights": sum(p.numel() for p in model.parameters()),
                     "export_s": export_s, "validate_s": s["validate"],
                     "samples": result.report.backends[0].samples if result.report else 0})
    table("Scaling: bnn_mlp to --target onnx; export (best of 2, no validation) and validation on digits "
          "(1,797 + crafted inputs)",
          ["width x depth", "weights", "export", "validation", "validation per 1k inputs"],
          [[f"{r['width']} x {r['depth']}", f"{r['weights']:,}", f"{r['export_s']:.2f} s", f"{r['validate_s']:.2f} s",
            f"{1000 * r['validate_s'] / max(r['samples'], 1):.2f} s"] for r in rows])
    # --quick runs are smoke tests: their plot goes to results/ (not committed), not over the published one
    plot_scaling(rows, [("export_s", "o-", "export (no validation)"), ("validate_s", "s-", "validation")],
                 "htaf-export --target onnx, bnn_mlp of growing size",
                 ROOT / "benchmarks" / ("results/scaling_onnx_quick.png" if quick else "scaling_onnx.png"))
    return rows


def memory(tmp: Path, nets: dict[str, Path]) -> list[dict]:
    resnet = [p for label, p in nets.items() if label.startswith("bnn_resnet")][0]
    rng = np.random.default_rng(0)
    for n in (1_000, 10_000):
        np.savez(tmp / f"inputs_{n}.npz", x=rng.random((n, 64), dtype=np.float32))
    imports = "import htaf_export, torch, onnxruntime, onnx\n"
    rows = [
        {"what": "imports only (baseline)", "mib": peak_rss_mib(imports)},
        {"what": "bare torch.onnx.export, bnn_resnet",
         "mib": peak_rss_mib(imports + f"import sys; sys.path.insert(0, 'benchmarks')\nfrom bench_onnx import bare_export\n"
                             f"m = htaf_export.load('{resnet}'); h = htaf_export.harden(m.module).model\n"
                             f"bare_export(h, m.input_shape)")},
        {"what": "htaf-export --no-validate, bnn_resnet",
         "mib": peak_rss_mib(imports + f"htaf_export.export('{resnet}', 'onnx', '{tmp}/m.onnx', validate_artifact=False)")},
    ]
    for n in (1_000, 10_000):
        rows.append({"what": f"validation of bnn_mlp over {n:,} inputs",
                     "mib": peak_rss_mib(imports + f"htaf_export.export('sample_models/bnn_mlp.pt', 'onnx', "
                                                   f"'{tmp}/v.onnx', data=__import__('pathlib').Path('{tmp}/inputs_{n}.npz'))")})
    base = rows[0]["mib"]
    table("Peak resident memory (child process)", ["run", "peak", "above imports"],
          [[r["what"], f"{r['mib']:.0f} MiB", f"{r['mib'] - base:+.0f} MiB"] for r in rows])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller networks, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    console.print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        nets = networks(tmp, args.quick)
        results = {"export": export_overhead(nets, tmp), "breakdown": breakdown(nets, tmp),
                   "size_inference": size_and_inference(nets),
                   "scaling": scaling(tmp, args.quick), "memory": memory(tmp, nets)}
    dump("onnx", results)


if __name__ == "__main__":
    main()
