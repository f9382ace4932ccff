"""Which target to use on this machine: the model's files timed here, not guessed.

Both ONNX files (float and integer) are converted from the capture and run by ONNX Runtime on one thread at
batch 1 for a short budget. A TFLite file that the export has just built is timed too (LCE's faster kernel for a
bit-packed file, the stock interpreter otherwise), when TensorFlow is already loaded: converting a TFLite file
only to time it would take longer than the export. The fastest is recommended, unless the float ONNX file is
within ``MIN_GAIN`` or ``MIN_SAVED_MS`` of it (the simplest file to deploy). An integer file without integer kernels (a model with
no binary layer) is not timed: it is the float graph again. On ARM the bit-packed TFLite file is recommended, because
LCE's optimised kernels are its ARM ones.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from . import metadata as md
from .capture import Capture
from .errors import BadInput, UnsupportedLayer
from .targets import TARGETS, ExportOptions

TIMED = ("onnx", "onnx-int8")
TFLITE_TARGETS = ("tflite", "tflite-float", "tflite-int8")
ARM = ("aarch64", "arm64", "armv7l", "armv8l")
BUDGET_S = 0.5  # per file
MIN_GAIN = 1.1  # another file must be at least this much faster to be worth a different target
MIN_SAVED_MS = 0.02  # and save at least this much per inference: below it, timings differ by noise


@dataclass(frozen=True)
class Timing:
    target: str
    ms: float


@dataclass(frozen=True)
class Recommendation:
    target: str
    machine: str
    timings: tuple[Timing, ...]
    reason: str

    def line(self) -> str:
        return f"recommended on this machine ({self.machine}): --target {self.target}: {self.reason}"

    def to_dict(self) -> dict:
        return asdict(self)


def _inputs(cap: Capture) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for value in cap.model.graph.inputs:
        dims = [d if isinstance(d, int) else 1 for d in (value.shape or [])]
        feed[str(value.name)] = rng.standard_normal(dims).astype(np.float32)
    return feed


def time_onnx(data: bytes, feed: Mapping[str, np.ndarray], budget_s: float = BUDGET_S) -> float:
    """Median milliseconds of ONNX Runtime (one thread) on ``feed``, runs within ``budget_s`` (at least 3)."""
    from .runtimes.onnxruntime import onnxruntime_module

    ort = onnxruntime_module()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    session.run(None, dict(feed))
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        session.run(None, dict(feed))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def recommend(cap: Capture, built: Mapping[str, bytes] | None = None) -> Recommendation | None:
    """Time the model's ONNX files here and say which target to use; None for streaming captures or when the
    timing cannot be done. ``built``: files already converted (by target name), not converted again."""
    if cap.streaming:
        return None
    try:
        return _recommend(cap, built or {})
    except Exception:  # noqa: BLE001 — advice only: no failure here may stop the export it accompanies
        return None


def _recommend(cap: Capture, built: Mapping[str, bytes]) -> Recommendation | None:
    feed = _inputs(cap)
    timings = []
    for name in TIMED:
        data = built.get(name)
        if data is None:
            try:
                data = TARGETS[name].function("converter")(cap, {md.TARGET: name}, ExportOptions()).data
            except (UnsupportedLayer, BadInput):
                continue
        if name == "onnx-int8" and not _runs_integer_kernels(data):
            continue  # the float graph again: timing it would only measure noise
        timings.append(Timing(name, time_onnx(data, feed)))
    timings += _tflite_timings(built)
    if not timings:
        return None
    machine = platform.machine() or "unknown"
    ms = {t.target: t.ms for t in timings}
    measured = ", ".join(f"{t.target} {t.ms:.2f} ms" for t in timings) + " at batch 1, one thread"
    if machine.lower() in ARM:
        return Recommendation("tflite", machine, tuple(timings),
                              f"LCE's optimised bit-packed kernels are its ARM ones, for binary layers on ±1 "
                              f"activations (measured here: {measured})")
    fastest = min(ms, key=ms.__getitem__)
    close = "onnx" in ms and (ms["onnx"] <= ms[fastest] * MIN_GAIN or ms["onnx"] - ms[fastest] < MIN_SAVED_MS)
    best = "onnx" if close else fastest
    why = (f"; onnx is within {MIN_GAIN:g}x or {MIN_SAVED_MS:g} ms of {fastest}, a difference this small is "
           f"noise" if close and fastest != "onnx" else "")
    return Recommendation(best, machine, tuple(timings), f"measured {measured}{why}")


def _runs_integer_kernels(data: bytes) -> bool:
    import onnx

    from .passes.util import INTEGER_WEIGHT_INPUTS  # the integer kernels onnx-int8 writes

    return any(node.op_type in INTEGER_WEIGHT_INPUTS for node in onnx.load_from_string(data).graph.node)


def _tflite_timings(built: Mapping[str, bytes]) -> list[Timing]:
    """The TFLite files the export built, timed, where TensorFlow is loaded already (advice must not load it)."""
    if "tensorflow" not in sys.modules:
        return []
    from .runtimes.tflite import time_kernels, time_stock

    timings = []
    for name in TFLITE_TARGETS:
        data = built.get(name)
        if data is not None:
            ms = min(time_kernels(data).values()) if name == "tflite" else time_stock(data)
            timings.append(Timing(name, ms))
    return timings
