"""Profile one export with cProfile (not part of run_all.py): where the time of each stage goes.

    python benchmarks/profile_export.py [--target tflite] [--network bnn_resnet] [--validate] [--top 40]

The export runs once unprofiled (warm-up: first-call set-up of the exporters is not what we profile),
then once under cProfile. Prints the stage seconds and the functions with the largest cumulative time;
``--out FILE.prof`` keeps the raw profile (open it with ``python -m pstats`` or snakeviz).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import torch  # noqa: E402

import htaf_export  # noqa: E402
from htaf_export.models import build  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="tflite", choices=("onnx", "tflite", "tflite-float"))
    parser.add_argument("--network", default="bnn_resnet", help="bnn_resnet (random weights) or a sample model name")
    parser.add_argument("--validate", action="store_true", help="profile validation too")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, help="write the raw profile here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    if args.network == "bnn_resnet":
        torch.manual_seed(0)
        path = tmp / "bnn_resnet.pt"
        htaf_export.save(build("bnn_resnet", {}).eval(), path)
    else:
        path = ROOT / "sample_models" / f"{args.network}.pt"
    out = tmp / ("model.onnx" if args.target == "onnx" else "model.tflite")
    with contextlib.redirect_stdout(io.StringIO()):
        htaf_export.export(path, args.target, out, validate_artifact=False)
        profile = cProfile.Profile()
        profile.enable()
        result = htaf_export.export(path, args.target, out, validate_artifact=args.validate)
        profile.disable()
    print(f"{args.network} → {args.target}: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
          + " (under cProfile, which inflates Python-heavy stages)")
    stats = pstats.Stats(profile)
    if args.out:
        stats.dump_stats(args.out)
    stages = stage_seconds(stats)
    if stages:
        print("stage functions (cumulative, under cProfile): " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    stats.sort_stats("cumulative").print_stats(args.top)


# The functions each stage of an export runs through (file suffix, function name), as the pipeline calls them.
STAGE_FUNCTIONS = {
    "capture": ("htaf_export/capture.py", "capture"),
    "onnx build": ("converters/onnx.py", "build"),
    "tflite converter": ("converters/tflite.py", "convert"),
    "of which Keras → .tflite (_to_tflite)": ("converters/tflite.py", "_to_tflite"),
    "tflite runtime stage: locate_steps": ("htaf_export/runtimes/tflite_locate.py", "locate_steps"),
    "tflite runtime stage: time_kernels": ("htaf_export/runtimes/tflite.py", "time_kernels"),
    "validate": ("htaf_export/pipeline.py", "validate_file"),
}


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each function in STAGE_FUNCTIONS that ran (recursion counted once by cProfile)."""
    found = {}
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for label, (suffix, function) in STAGE_FUNCTIONS.items():
            if name == function and filename.replace("\\", "/").endswith(suffix):
                found[label] = found.get(label, 0.0) + cumulative
    return {label: found[label] for label in STAGE_FUNCTIONS if label in found}


if __name__ == "__main__":
    main()
