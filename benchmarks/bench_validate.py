"""Validation cost against its floor: the runtimes' own inference time for the same inputs, measured in this run.

For bnn_resnet (random weights, as in the other benchmarks) exported to ONNX and to bit-packed TFLite:

- baseline: every runtime that validation runs (ONNX Runtime; LCE with both kernels) called on the
  validation inputs (512 generated samples + the crafted threshold inputs) and nothing else;
- validation wall time in one process, and with ``--workers 2`` (a process pool), each as a ratio to the
  baseline, and the speed-up of two workers over one.

``python benchmarks/bench_validate.py [--quick]`` (quick: a smaller ResNet).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import htaf_export  # noqa: E402
from htaf_export.harden import harden, record_every_step  # noqa: E402
from htaf_export.models import build  # noqa: E402
from htaf_export.pipeline import default_data, recipe_of, validate_file  # noqa: E402
from htaf_export.runtimes import backends_for, read_artifact  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import console, dump, machine, table  # noqa: E402
from keras_models import quiet  # noqa: E402

RESNET_QUICK = {"blocks": [2, 2, 2, 2]}


def runtime_seconds(artifact: Path, samples: int, shape: list[int]) -> float:
    """The runtimes alone on ``samples`` inputs, in batches of 256 as validation feeds them."""
    info = read_artifact(artifact)
    runners, _ = backends_for(info, "cpu")
    x = np.random.default_rng(0).standard_normal((samples, *shape)).astype(np.float32)
    total = 0.0
    for runner in runners:
        for i in range(0, samples, 256):
            feed = {info.input_names[0]: x[i:i + 256]}
            started = time.perf_counter()
            runner.run(feed)
            total += time.perf_counter() - started
    return total


def measure(model_path: Path, target: str, tmp: Path) -> dict:
    artifact = tmp / f"resnet.{'onnx' if target == 'onnx' else 'tflite'}"
    with quiet():
        htaf_export.export(model_path, target, artifact, validate_artifact=False)
    loaded = htaf_export.load(model_path)
    info = read_artifact(artifact)
    hardening = record_every_step(harden(loaded.module), loaded.input_shapes, [s.site for s in info.steps])
    data = default_data(loaded.input_shapes, None)
    walls = {}
    samples = 0
    for workers in (1, 2):
        with quiet():
            report = validate_file(hardening, info, data, str(model_path), "cpu", workers=workers,
                                   recipe=recipe_of(loaded, None, [s.site for s in info.steps]))
        assert report.passed, report.failure_line()
        walls[workers] = report.seconds
        samples = report.backends[0].samples + report.backends[0].crafted.samples
    with quiet():
        baseline = runtime_seconds(artifact, samples, list(loaded.input_shape))
    return {"target": target, "backends": len(backends_for(info, "cpu")[0]), "samples": samples,
            "baseline_s": baseline, "one_s": walls[1], "two_s": walls[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller ResNet")
    args = parser.parse_args()
    console.print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.manual_seed(0)
        resnet = build("bnn_resnet", RESNET_QUICK if args.quick else {}).eval()
        path = htaf_export.save(resnet, tmp / "bnn_resnet.pt")
        rows = [measure(path, target, tmp) for target in ("onnx", "tflite")]
    weights = sum(p.numel() for p in resnet.parameters()) / 1e6
    table(f"Validation of bnn_resnet ({weights:.1f} M weights) against the runtimes' own inference time "
          f"(baseline: the same runtimes on the same number of inputs, nothing else)",
          ["target (runtimes)", "inputs", "baseline", "validation, 1 process", "ratio", "--workers 2", "ratio",
           "speed-up of 2 workers"],
          [[f"{r['target']} ({r['backends']})", r["samples"], f"{r['baseline_s']:.1f} s", f"{r['one_s']:.1f} s",
            f"{r['one_s'] / r['baseline_s']:.2f}x", f"{r['two_s']:.1f} s", f"{r['two_s'] / r['baseline_s']:.2f}x",
            f"{r['one_s'] / r['two_s']:.2f}x"] for r in rows])
    dump("validate", {"rows": rows})


if __name__ == "__main__":
    main()
