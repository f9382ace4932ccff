"""Shared helpers for the benchmark scripts: timing, peak memory in a child process, tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console(width=140)


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Smallest wall time of ``repeat`` calls: the least disturbed by other load on a shared machine."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r])
    console.print(t)


def peak_rss_mib(code: str) -> float:
    """Run ``code`` in a fresh Python and return its peak resident memory (MiB), as the kernel counted it."""
    # VmHWM starts afresh at exec; ru_maxrss would carry over this (large) parent's high-water mark.
    wrapper = (code + "\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
               "print('PEAK', int(hwm.split()[1]) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK")][-1]
    return float(line.split()[1])


def dump(name: str, payload: dict) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
