"""Run every benchmark in turn and print each one's tables: `make bench` or `python benchmarks/run_all.py [--quick]`.

About 7 minutes on 2 cores (the budget is 10); --quick (smaller networks, fewer repeats) about 5. Results go
to benchmarks/results/*.json (not committed), plots to benchmarks/*.png; benchmarks/README.md holds the
latest full run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_imports.py", "bench_onnx.py", "bench_tflite_export.py", "bench_tflite.py"]
BUDGET_S = 600


def main() -> int:
    failed = []
    took = {}
    suite = time.perf_counter()
    for script in SCRIPTS:
        start = time.perf_counter()
        print(f"\n=== {script} ===", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script), *sys.argv[1:]], cwd=HERE.parent)
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
