"""Run every benchmark in turn and print each one's tables: `make bench` or `python benchmarks/run_all.py [--quick]`.

About 7 minutes on 2 cores (the budget is 10); --quick (smaller networks, fewer repeats) about 5. Results go
to benchmarks/results/*.json (not committed), plots to benchmarks/*.png; benchmarks/README.md holds the
latest full run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_imports.py", "bench_onnx.py", "bench_tflite_export.py", "bench_tflite.py"]
# bench_validate.py (about 4 min in full) runs on its own: with it the suite would pass its 10-minute budget
BUDGET_S = 600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller networks and fewer repeats in every script, for a smoke run")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, metavar="SCRIPT",
                        help=f"run only these scripts (of {', '.join(SCRIPTS)})")
    args = parser.parse_args()
    passed = ["--quick"] if args.quick else []
    failed = []
    took = {}
    suite = time.perf_counter()
    for script in args.only or SCRIPTS:
        start = time.perf_counter()
        print(f"\n=== {script} ===", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script), *passed], cwd=HERE.parent)
        took[script] = time.perf_counter() - start
        print(f"=== {script}: exit {rc}, {took[script]:.0f} s ===", flush=True)
        if rc:
            failed.append(script)
    total = time.perf_counter() - suite
    print("\n" + ", ".join(f"{s} {t:.0f} s" for s, t in took.items()))
    print(f"suite: {total:.0f} s ({total / 60:.1f} min, budget {BUDGET_S / 60:.0f} min)"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or total > BUDGET_S else 0


if __name__ == "__main__":
    sys.exit(main())
