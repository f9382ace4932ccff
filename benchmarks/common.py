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

from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
# Wide enough that no cell wraps: tables print as Markdown, the same text that benchmarks/README.md holds.
console = Console(width=400, soft_wrap=True)


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Smallest wall time of ``repeat`` calls: the least disturbed by other load on a shared machine."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 2) -> float:
    """Median wall time of ``runs`` calls after ``warmup`` calls, in milliseconds (latency of a steady state)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    mid = len(times) // 2
    return 1000 * (times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2)


def stock_tflite(data: bytes, threads: int, batch: int | None = None, xnnpack: bool = True):
    """The stock TFLite interpreter on ``data`` (XNNPACK on, as users run it, or builtin kernels only), resized
    to ``batch`` (None: the file's own), allocated, with seeded noise as its input: call ``.invoke()`` to time."""
    import numpy as np

    from htaf_export import tflite_file as tfl  # TensorFlow only for the scripts that time TFLite files

    tf = tfl.tensorflow()
    resolver = tf.lite.experimental.OpResolverType
    with tfl.quiet_stderr():
        it = tf.lite.Interpreter(model_content=data, num_threads=threads, experimental_op_resolver_type=(
            resolver.AUTO if xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
        detail = it.get_input_details()[0]
        if batch is not None:
            it.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
        it.allocate_tensors()
    detail = it.get_input_details()[0]
    it.set_tensor(detail["index"], np.random.default_rng(0).standard_normal(detail["shape"]).astype(np.float32))
    return it


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    t = Table(title=title, title_justify="left", box=box.MARKDOWN)
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


def verdict(report) -> str:
    """A parity report in one line: pass, or which tensors failed, and how many step tensors were exact."""
    if report is None:
        return "not validated"
    tensors = report.backends[0].tensors if report.backends else []
    steps = [t for t in tensors if t.kind == "binary"]
    exact = sum(1 for t in steps if t.passed)
    if report.passed:
        return f"pass ({report.backends[0].samples:,} inputs, {exact}/{len(steps)} steps exact)"
    bad = sorted({f"{t.name} (max err {t.max_abs_error:.1e})" if t.kind == "float" else t.name
                  for b in report.backends for t in b.tensors if not t.passed})
    return f"FAIL: {', '.join(bad)}; {exact}/{len(steps)} steps exact"


def dump(name: str, payload: dict) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))


class Timers:
    """Wrap named callables (module or class attributes) to add up their wall time; ``restore()`` puts them back.

    For breakdowns of one instrumented run, never for the timed runs themselves."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._saved: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, label: str, wrap_result=None) -> None:
        original = getattr(owner, attr)
        self._saved.append((owner, attr, original))
        seconds = self.seconds
        seconds.setdefault(label, 0.0)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                value = original(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
            return wrap_result(value) if wrap_result else value

        setattr(owner, attr, timed)

    def timed_fn(self, label: str):
        """A wrapper for a returned callable (an interpreter's run function)."""
        self.seconds.setdefault(label, 0.0)

        def wrap(fn):
            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds[label] += time.perf_counter() - start
            return timed
        return wrap

    def restore(self) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()


def plot_scaling(rows: list[dict], series: list[tuple[str, str, str]], title: str, path: Path) -> None:
    """Seconds against weights, one line per (row key, marker style, label) in ``series``; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    weights = [r["weights"] for r in rows]
    for key, style, label in series:
        ax.plot(weights, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("weights")
    ax.set_ylabel("seconds")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
