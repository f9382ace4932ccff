"""GPU parity in one table: the bundled samples and bnn_resnet exported to ONNX, each validated on every
backend this machine has (ONNX Runtime on CPU and CUDA, the hardened model itself on torch-cuda) against
the CPU reference. Backends that cannot run here are listed as skipped, with the reason.

``scripts/gpu-parity.sh [--quick] [--markdown FILE]``; exit 1 when any backend fails parity.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA starts
warnings.filterwarnings("ignore")  # torch.export's deprecation chatter, as the command line does

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import htaf_export  # noqa: E402
from htaf_export.models import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ["bnn_mlp", "bnn_cnn", "dhn_mlp", "snn_mlp", "icbm_cnn"]
COLUMNS = ["model", "backend", "inputs", "flips ✗ / ✓", "max err", "result", "s"]


def machine() -> str:
    try:
        import onnxruntime as ort
        runtime = f"onnxruntime {ort.__version__} ({', '.join(p.replace('ExecutionProvider', '') for p in ort.get_available_providers())})"
    except ImportError:
        runtime = "no onnxruntime"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return f"{gpu}; torch {torch.__version__}; {runtime}; Python {platform.python_version()}"


def rows_of(name: str, report, reasons: list[str]) -> list[list[str]]:
    """One row per backend; a backend not run points to its reason (``reasons``, numbered once each)."""
    rows = []
    for b in report.backends:
        binary = [t for t in b.tensors if t.kind == "binary"]
        floats = [t.max_abs_error for t in b.tensors if t.kind == "float"]
        rows.append([name, b.backend, f"{b.samples + b.crafted.samples:,}",
                     f"{sum(t.unexplained for t in binary):,} / {sum(t.explained for t in binary):,}",
                     f"{max(floats, default=0.0):.1e}", "pass" if b.passed else f"FAIL at {b.first_failure}",
                     f"{b.seconds:.1f}"])
    for s in report.skipped:
        if s["reason"] not in reasons:
            reasons.append(s["reason"])
        rows.append([name, s["backend"], "-", "-", "-", f"skip ({reasons.index(s['reason']) + 1})", "-"])
    return rows


def models(tmp: Path, quick: bool) -> list[tuple[str, Path]]:
    found = [(n, ROOT / "sample_models" / f"{n}.pt") for n in SAMPLES]
    torch.manual_seed(0)
    resnet = build("bnn_resnet", {"blocks": [1, 1, 1, 1]} if quick else {}).eval()
    found.append(("bnn_resnet", htaf_export.save(resnet, tmp / "bnn_resnet.pt")))
    return found


def markdown(rows: list[list[str]], header: str, notes: list[str]) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [""] + notes) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller ResNet")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to FILE")
    args = parser.parse_args()
    started = time.perf_counter()
    rows: list[list[str]] = []
    reasons: list[str] = []
    failed = False
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, path in models(tmp, args.quick):
            result = htaf_export.export(path, "onnx", tmp / f"{path.stem}.onnx", device="all")
            rows += rows_of(name, result.report, reasons)
            failed |= not result.report.passed
    header = (f"GPU parity{' (--quick: a smaller ResNet)' if args.quick else ''}, {machine()}; "
              f"{time.perf_counter() - started:.0f} s in all")
    notes = [f"({i}) {reason}" for i, reason in enumerate(reasons, start=1)]
    console = Console()
    console.print(header)
    table = Table(caption="flips ✗ / ✓: unexplained / explained by rounding; max err: largest float output error; "
                          "ort: onnxruntime",
                  caption_justify="left")
    for c in COLUMNS:
        table.add_column(c, no_wrap=True)
    for r in rows:  # "ort-" keeps the table within 80 columns; the Markdown has the full names
        table.add_row(r[0], r[1].replace("onnxruntime-", "ort-"), *r[2:])
    console.print(table)
    for note in notes:
        console.print(note)
    if args.markdown:
        args.markdown.write_text(markdown(rows, header, notes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
