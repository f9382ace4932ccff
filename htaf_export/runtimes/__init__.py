"""Runtimes that execute an artifact on inputs in PyTorch layout and return its named tensors.

A runner's ``run(inputs)`` takes ``{input name: array}`` and returns the graph outputs plus every step
tensor named in the artifact's metadata, all in PyTorch layout (NCHW), so validation compares like
with like whatever the runtime's own layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..capture import StepNode


@dataclass
class ArtifactInfo:
    """What an artifact file says about itself (read from its metadata)."""

    path: Path
    kind: str  # "onnx" or "tflite"
    input_names: list[str]
    output_names: list[str]
    steps: list[StepNode] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        return self.metadata.get("htaf_export.snn_mode") == "streaming"

    @property
    def tie(self) -> str | None:
        return self.metadata.get("htaf_export.tie")


class Runner(Protocol):
    name: str
    device: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def runners_for(info: ArtifactInfo, device: str = "all") -> list[Runner]:
    """Every runtime on this machine that can execute the artifact on the requested device."""
    if info.kind == "onnx":
        from .onnxruntime import onnx_runners

        return onnx_runners(info, device)
    from .tflite import tflite_runners  # imports TensorFlow: only for .tflite artifacts

    return tflite_runners(info, device)


def read_artifact(path: Path) -> ArtifactInfo:
    from ..errors import BadInput

    if not path.is_file():
        raise BadInput(f"artifact {path} does not exist")
    if path.suffix == ".onnx":
        from .onnxruntime import read_onnx_artifact

        return read_onnx_artifact(path)
    if path.suffix == ".tflite":
        from .tflite import read_tflite_artifact

        return read_tflite_artifact(path)
    raise BadInput(f"artifact {path} is neither .onnx nor .tflite")
