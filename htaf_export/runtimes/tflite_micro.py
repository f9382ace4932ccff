"""TensorFlow Lite for Microcontrollers' interpreter (its reference kernels, run here on the host) as a validation
backend for files that use builtin ops only (``tflite-float``, ``tflite-int8``): the file a microcontroller would
run, checked tensor by tensor like on every other runtime. Optional: ``pip install -e .[micro]``."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import metadata as md
from ..errors import BadInput
from ..files import silenced
from ..tflite_file import read_model
from . import ArtifactInfo
from .tflite import _TfliteRunner

NAME = "tflite-micro"
BUILTIN_TARGETS = ("tflite-float", "tflite-int8")  # the TFLite targets without LCE ops
ARENA_FLOOR = 4 << 20  # bytes: TFLM plans every tensor into one arena, fixed when the interpreter is made
LARGEST = 4 << 20  # bytes: past this a file is no microcontroller's, and TFLM's reference kernels take minutes


def available() -> bool:
    return importlib.util.find_spec("tflite_micro") is not None


def why_not(info: ArtifactInfo) -> str | None:
    """Why TFLite Micro, installed here, does not validate a builtin-op file; None when it does (or when the file
    is not one it reads, or the optional extra is missing: neither is worth a line in every report)."""
    if not available() or info.metadata.get(md.TARGET) not in BUILTIN_TARGETS:
        return None
    stat = Path(info.path).stat()
    if stat.st_size > LARGEST:
        return (f"the file ({stat.st_size / 2**20:.1f} MiB) is larger than a microcontroller holds "
                f"(TFLite Micro validates files up to {LARGEST >> 20} MiB)")
    return _unloadable(str(info.path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _unloadable(path: str, size: int, mtime_ns: int) -> str | None:
    """Why TFLite Micro cannot open the file (an op it has no kernel for: SIGN, for one), else None; once per
    file version (``why_not`` is asked when the runners are made and again for the report). TFLM says which
    op on standard error, from C++; read it there."""
    from tflite_micro.python.tflite_micro import runtime

    data = Path(path).read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        said = Path(folder) / "said.txt"
        try:
            sys.stderr.flush()
            with silenced(2, str(said)):
                interpreter = runtime.Interpreter.from_bytes(data, arena_size=max(ARENA_FLOOR, 8 * len(data)))
                _invoke_on_zeros(interpreter, len(read_model(data).subgraphs[0].inputs))
            return None
        except (RuntimeError, ValueError) as e:
            missing = re.findall(r"Didn't find op for builtin opcode '(\w+)'", said.read_text(errors="replace"))
            if missing:
                return f"TFLite Micro has no kernel for {', '.join(sorted(set(missing)))}"
            failed = re.findall(r"Node (\w+) \(number \d+\) failed to (?:prepare|invoke)", said.read_text(errors="replace"))
            if failed:
                return f"TFLite Micro cannot run {', '.join(sorted(set(failed)))} as this file uses it"
            return f"TFLite Micro cannot load the file: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"


def _invoke_on_zeros(interpreter, inputs: int) -> None:
    """One run on zeros: a kernel TFLite Micro has, but not for these types (ARG_MAX to int64), fails only here."""
    for k in range(inputs):
        details = interpreter.get_input_details(k)
        interpreter.set_input(np.zeros(details["shape"], details["dtype"]), k)
    interpreter.invoke()


def micro_runners(info: ArtifactInfo, device: str = "all") -> list["MicroRunner"]:
    """TFLite Micro for a file without LCE ops that a microcontroller could hold, where the extra is installed."""
    if device == "cuda" or not available() or info.metadata.get(md.TARGET) not in BUILTIN_TARGETS or why_not(info):
        return []
    return [MicroRunner(info)]


class MicroRunner(_TfliteRunner):
    """One sample at a time, as on the device; the arena is sized from the file (activations, not weights)."""

    name = NAME

    def __init__(self, info: ArtifactInfo) -> None:
        super().__init__(info)
        from tflite_micro.python.tflite_micro import runtime

        arena = max(ARENA_FLOOR, 8 * len(self.data))
        try:
            self.interpreter = runtime.Interpreter.from_bytes(self.data, arena_size=arena)
        except (RuntimeError, ValueError) as e:
            raise BadInput(f"TFLite Micro cannot load {info.path}: {str(e).splitlines()[0][:200]}") from None
        subgraph = read_model(self.data).subgraphs[0]
        self.input_positions = {int(index): k for k, index in enumerate(subgraph.inputs)}
        self.outputs = [int(i) for i in subgraph.outputs]

    def _invoke(self, sample: list[np.ndarray]) -> dict[int, np.ndarray]:
        for slot, x in zip(self.inputs, sample):
            self.interpreter.set_input(np.ascontiguousarray(x), self.input_positions[slot.index])
        self.interpreter.invoke()
        return {index: self.interpreter.get_output(k).copy() for k, index in enumerate(self.outputs)}
