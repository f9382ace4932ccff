"""Run every benchmark in turn (about 10 minutes on 2 cores): `make bench` or `python benchmarks/run_all.py`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_onnx.py", "bench_tflite.py"]


def main() -> int:
    failed = []
    for script in SCRIPTS:
        start = time.perf_counter()
        print(f"\n=== {script} ===", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script), *sys.argv[1:]], cwd=HERE.parent)
        print(f"=== {script}: exit {rc}, {time.perf_counter() - start:.0f} s ===", flush=True)
        if rc:
            failed.append(script)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
