"""Runtimes that execute an artifact on inputs in PyTorch layout and return its named tensors.

A runner's ``run(inputs)`` takes ``{input name: array}`` and returns the graph outputs plus every step
tensor named in the artifact's metadata, all in PyTorch layout (NCHW), so validation compares like
with like whatever the runtime's own layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from .. import metadata as md
from ..contracts import StepSpec
from ..errors import BadInput


@dataclass(frozen=True)
class ArtifactInfo:
    """What an artifact file says about itself (read from its metadata)."""

    path: Path
    kind: str  # "onnx", "tflite" or "nir"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    steps: tuple[StepSpec, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    # step tensor → the layer (weights) that feeds it, where the file shows it; used to name failures
    layers: Mapping[str, str] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        return self.metadata.get(md.SNN_MODE) == "streaming"

    @property
    def tie(self) -> str | None:
        return self.metadata.get(md.TIE)


def read_steps(path: Path, metadata: Mapping[str, str]) -> list[StepSpec]:
    """The step list an artifact's metadata declares; one clear error for a damaged entry."""
    try:
        return [StepSpec.from_dict(s) for s in json.loads(metadata[md.STEPS])]
    except (ValueError, TypeError, KeyError):
        raise BadInput(f"artifact {path} has unreadable {md.STEPS} metadata") from None


class Runner(Protocol):
    name: str
    device: str
    # seconds spent inside the runtime's own inference calls (not decoding, not layout changes): the
    # baseline that validation's cost is measured against
    inference_seconds: float

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def runners_for(info: ArtifactInfo, device: str = "all", threads: int = 0) -> list[Runner]:
    """Every runtime on this machine that can execute the artifact on the requested device (``threads``:
    ONNX Runtime's intra-op threads, 0 for its default; the TFLite interpreters run one thread)."""
    if info.kind == "nir":
        from .nir_sim import NirSimRunner
        from .nir_snntorch import SnnTorchRunner, why_not

        if device not in ("cpu", "all"):
            return []
        sim = NirSimRunner(info)
        return [sim] + ([] if why_not(sim.graph) else [SnnTorchRunner(info)])
    if info.kind == "onnx" and info.metadata.get(md.ONNX_MODE) == "qonnx":
        from .qonnx_exec import QonnxRunner

        return [QonnxRunner(info)] if device in ("cpu", "all") else []
    if info.kind == "onnx":
        from .onnxruntime import onnx_runners

        return onnx_runners(info, device, threads)
    from .tflite import tflite_runners  # imports TensorFlow: only for .tflite artifacts
    from .tflite_micro import micro_runners

    runners: list[Runner] = list(tflite_runners(info, device))
    return runners + micro_runners(info, device)


def backends_for(info: ArtifactInfo, device: str = "all", model=None, threads: int = 0
                 ) -> tuple[list[Runner], list[tuple[str, str]]]:
    """The runners to validate with, and (backend, reason) for each known backend that cannot run here.

    Artifact runners come first (ONNX Runtime CPU, then CUDA; or the TFLite interpreters), then, when a
    hardened ``model`` is given, PyTorch on CUDA, which checks the reference itself on the GPU.
    """
    if device not in ("cpu", "cuda", "all"):
        raise BadInput(f"unknown device {device!r}; choose cpu, cuda or all")
    runners = list(runners_for(info, device, threads))
    skipped: list[tuple[str, str]] = []
    qonnx = info.metadata.get(md.ONNX_MODE) == "qonnx"
    if qonnx:
        from .qonnx_exec import ORT_SKIP

        skipped.append(ORT_SKIP)
    if info.kind == "onnx" and device in ("cuda", "all") and not qonnx:
        from .onnxruntime import cuda_unavailable

        reason = cuda_unavailable()
        if reason:
            skipped.append(("onnxruntime-cuda", reason))
    if info.kind == "nir":
        from .nir_file import load_graph
        from .nir_snntorch import NAME, why_not

        reason = why_not(load_graph(info.path))
        if reason:
            skipped.append((NAME, reason))
        if device == "cuda":
            skipped.append(("nir", "the NIR simulators here run on the CPU"))
    if info.kind == "tflite" and device == "cuda":
        skipped.append(("tflite", "the TFLite interpreters run on the CPU only"))
    if info.kind == "tflite" and device != "cuda":
        from .tflite_micro import NAME, why_not

        reason = why_not(info)
        if reason:
            skipped.append((NAME, reason))
    if model is not None and device in ("cuda", "all"):
        from .torch_cuda import torch_cuda_runners

        more, why = torch_cuda_runners(model, info)
        runners += more
        skipped += why
    return runners, skipped


def read_artifact(path: Path) -> ArtifactInfo:
    if not path.is_file():
        raise BadInput(f"artifact {path} {'is a directory, not a file' if path.is_dir() else 'does not exist'}")
    if path.stat().st_size == 0:
        raise BadInput(f"artifact {path} is empty (0 bytes): an export that did not finish?")
    if path.suffix == ".onnx":
        from .onnxruntime import read_onnx_artifact

        return read_onnx_artifact(path)
    if path.suffix == ".tflite":
        from .tflite import read_tflite_artifact

        return read_tflite_artifact(path)
    if path.suffix == ".nir":
        from .nir_file import read_nir_artifact

        return read_nir_artifact(path)
    raise BadInput(f"artifact {path} is not an .onnx, .tflite or .nir file")
