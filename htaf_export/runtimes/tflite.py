"""TFLite runtimes: the Larq Compute Engine interpreter (default and indirect-BGEMM kernels) and stock TFLite.

A runner exposes the observed step tensors by adding them to the subgraph's outputs (nothing else in
the file changes, so the same kernels run), runs one sample at a time (LCE fixes the batch at 1), and
returns every output and observed step in PyTorch layout. ``ArtifactInfo.steps`` lists only the
observed steps, so validation compares exactly what the file computes. Where the file keeps its
tensors: ``htaf_export.tflite_file``.
"""

from __future__ import annotations

import abc
import json
import time
from pathlib import Path

import numpy as np

from .. import metadata as md
from ..errors import BadInput
from ..tflite_file import (TfliteLayout, decode, encode_input, op_names, quiet_stderr, read_metadata, read_model,
                           tensorflow, with_outputs)
from . import ArtifactInfo, read_steps

LCE_OPS = ("LceQuantize", "LceDequantize", "LceBconv2d", "LceBMaxPool2d")
LCE_KERNELS = {"default": {}, "indirect_bgemm": {"use_indirect_bgemm": True}}
KERNEL_TIMING_BUDGET_S = 0.4


def read_tflite_artifact(path: Path) -> ArtifactInfo:
    try:
        model = read_model(Path(path).read_bytes())
    except BadInput as e:
        raise BadInput(f"artifact {path}: {e}") from None
    try:
        meta = read_metadata(model)
    except (ValueError, UnicodeDecodeError):
        raise BadInput(f"artifact {path} has unreadable htaf_export metadata") from None
    if md.STEPS not in meta or md.TFLITE_IO not in meta:
        raise BadInput(f"artifact {path} was not written by htaf-export (no htaf_export metadata)")
    try:
        layout = TfliteLayout.of(meta)
        layers = json.loads(meta.get(md.TFLITE_STEP_LAYERS, "{}"))
    except (ValueError, TypeError, KeyError):
        raise BadInput(f"artifact {path} has unreadable htaf_export metadata") from None
    observed = {s.tensor for s in layout.steps}
    steps = tuple(s for s in read_steps(path, meta) if s.tensor in observed)
    return ArtifactInfo(Path(path), "tflite", tuple(i.name for i in layout.inputs),
                        tuple(o.name for o in layout.outputs), steps, meta, layers)


class _TfliteRunner(abc.ABC):
    """Shared part: the file with observed steps as extra outputs, run one sample at a time."""

    name: str
    device = "cpu"

    def __init__(self, info: ArtifactInfo) -> None:
        self.layout = TfliteLayout.of(info.metadata)
        self.slots = (*self.layout.outputs, *self.layout.steps)
        self.indices = [s.index for s in self.slots]
        self.data = with_outputs(Path(info.path).read_bytes(), self.indices)
        # inputs in the subgraph's order, which is how the interpreters take them
        order = [int(i) for i in read_model(self.data).subgraphs[0].inputs]
        self.inputs = sorted(self.layout.inputs, key=lambda slot: order.index(slot.index))
        self.inference_seconds = 0.0

    @abc.abstractmethod
    def _invoke(self, sample: list[np.ndarray]) -> dict[int, np.ndarray]:
        """Run one sample; return the requested tensors by index (each interpreter does it its own way)."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [encode_input(inputs[slot.name], slot.layout) for slot in self.inputs]
        n = len(arrays[0])
        started = time.perf_counter()
        per_sample = [self._invoke([a[k:k + 1] for a in arrays]) for k in range(n)]
        self.inference_seconds += time.perf_counter() - started
        result = {}
        for slot in self.slots:
            stacked = np.concatenate([s[slot.index] for s in per_sample])
            result[getattr(slot, "tensor", None) or slot.name] = decode(stacked, slot)  # type: ignore[union-attr]
        return result


def lce_interpreter(data: bytes, kernel: str = "default", threads: int = 1):
    """LCE's Python interpreter on ``data`` with one of its binary conv kernels."""
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    return Interpreter(data, num_threads=threads, **LCE_KERNELS[kernel])


class LceRunner(_TfliteRunner):
    """Larq Compute Engine's interpreter (runs LCE custom ops and builtins), with one of its bconv kernels."""

    def __init__(self, info: ArtifactInfo, kernel: str = "default", threads: int = 1) -> None:
        super().__init__(info)
        self.name = f"lce-{kernel.replace('_', '-')}"
        try:
            self.interpreter = lce_interpreter(self.data, kernel, threads)
        except (RuntimeError, ValueError) as e:
            raise BadInput(f"the LCE interpreter cannot load {info.path}: {str(e).splitlines()[0][:200]}") from None
        self.outputs = [int(i) for i in read_model(self.data).subgraphs[0].outputs]

    def _invoke(self, sample: list[np.ndarray]) -> dict[int, np.ndarray]:
        values = self.interpreter.interpreter.predict(sample)
        return dict(zip(self.outputs, values))


def stock_interpreter(data: bytes, threads: int = 1):
    """TensorFlow's own TFLite interpreter on ``data``, tensors allocated."""
    tf = tensorflow()
    with quiet_stderr():
        interpreter = tf.lite.Interpreter(model_content=data, num_threads=threads)
        interpreter.allocate_tensors()
    return interpreter


class StockTfliteRunner(_TfliteRunner):
    """TensorFlow's own TFLite interpreter (builtin ops only)."""

    def __init__(self, info: ArtifactInfo, threads: int = 1) -> None:
        super().__init__(info)
        self.name = "tflite"
        try:
            self.interpreter = stock_interpreter(self.data, threads)
        except (RuntimeError, ValueError) as e:
            raise BadInput(f"the TFLite interpreter cannot load {info.path}: {str(e).splitlines()[0][:200]}") from None

    def _invoke(self, sample: list[np.ndarray]) -> dict[int, np.ndarray]:
        for slot, x in zip(self.inputs, sample):
            self.interpreter.set_tensor(slot.index, x)
        self.interpreter.invoke()
        return {i: self.interpreter.get_tensor(i) for i in self.indices}


def uses_lce(data: bytes) -> bool:
    return any(op in LCE_OPS for op in op_names(read_model(data)))


def tflite_runners(info: ArtifactInfo, device: str = "all") -> list[_TfliteRunner]:
    """CPU only. The LCE interpreter with both kernels for the bit-packed target (and any file with LCE ops);
    the stock TFLite interpreter for every file without LCE ops (``tflite_micro`` adds TFLite Micro's)."""
    if device == "cuda":
        return []
    lce = uses_lce(Path(info.path).read_bytes())
    runners: list[_TfliteRunner] = []
    if lce or info.metadata.get(md.TARGET) == "tflite":
        runners += [LceRunner(info, kernel) for kernel in LCE_KERNELS]
    if not lce:
        runners.append(StockTfliteRunner(info))
    return runners


def time_stock(data: bytes, threads: int = 1, budget_s: float = KERNEL_TIMING_BUDGET_S / 2) -> float:
    """Median milliseconds per batch-1 inference of ``data`` on the stock interpreter (XNNPACK), zeros in."""
    interpreter = stock_interpreter(data, threads)
    for detail in interpreter.get_input_details():
        if len(detail["shape"]) and detail["shape"][0] != 1:
            interpreter.resize_tensor_input(detail["index"], [1, *detail["shape"][1:]])
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))
    interpreter.invoke()  # warm-up
    return _median_ms(interpreter.invoke, budget_s)


def time_kernels(data: bytes, threads: int = 1) -> dict[str, float]:
    """Median milliseconds per batch-1 inference of ``data`` on each LCE kernel (within a small time budget)."""
    timings: dict[str, float] = {}
    for kernel in LCE_KERNELS:
        interpreter = lce_interpreter(data, kernel, threads)
        x = [np.zeros(shape, dtype=np.float32) for shape in interpreter.input_shapes]
        interpreter.interpreter.predict(x)  # warm-up: allocation, packing
        timings[kernel] = _median_ms(lambda: interpreter.interpreter.predict(x), KERNEL_TIMING_BUDGET_S / 2)
    return timings


def _median_ms(invoke, budget_s: float) -> float:
    """Median milliseconds of ``invoke()`` over 3 to 50 calls, stopping once ``budget_s`` is spent."""
    runs: list[float] = []
    start = time.perf_counter()
    while len(runs) < 50 and (len(runs) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        invoke()
        runs.append(time.perf_counter() - t)
    return 1000 * float(np.median(runs))
