"""PyTorch on CUDA: the hardened model itself on the GPU, compared with the CPU reference like any artifact.

It answers "does my model make the same binary decisions on the GPU?", which is where training
happened and where a user may also deploy. The runner holds its own copy of the model (the CPU
reference is never moved) and turns TF32 off while it runs, so float32 means float32 on the GPU too
(PyTorch lets cuDNN convolutions use TF32 by default, which alone flips many bits).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..nn.modules import set_eval
from ..reference import run_reference
from . import ArtifactInfo


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """No TF32 in matmuls or cuDNN convolutions inside the block, and deterministic kernels where torch has
    them (cuDNN's autotuner off), so that two runs give the same bits; previous settings restored after."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)  # ops without a deterministic kernel still run
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = previous[:4]
        torch.use_deterministic_algorithms(previous[4], warn_only=previous[5])


class TorchRunner:
    """The hardened model on ``device``, returning the artifact's named outputs and step tensors.

    Step tensors are matched to the model's Step calls by (site, call), as the reference records them.
    """

    def __init__(self, model: nn.Module, info: ArtifactInfo, device: str = "cuda") -> None:
        self.info = info
        self.device = device
        self.name = f"torch-{device}"
        self.model = copy.deepcopy(model).to(device)
        set_eval(self.model)
        self.inference_seconds = 0.0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(inputs[name], dtype=np.float32))
                        for name in self.info.input_names)
        started = time.perf_counter()
        with strict_float32():
            ref = run_reference(self.model, tensors, self.info.output_names, self.device, streaming=self.info.streaming)
        self.inference_seconds += time.perf_counter() - started
        out = dict(ref.outputs)
        for s in self.info.steps:
            value = ref.steps.get((s.site, s.call))
            if value is not None:
                out[s.tensor] = value
        return out


def torch_cuda_runners(model: nn.Module, info: ArtifactInfo) -> tuple[list[TorchRunner], list[tuple[str, str]]]:
    """A ``torch-cuda`` runner when PyTorch sees a GPU; otherwise none, and the reason."""
    # cuBLAS is deterministic only with a fixed workspace; read when its first handle is made
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not torch.cuda.is_available():
        return [], [("torch-cuda", "torch.cuda.is_available() is False")]
    return [TorchRunner(model, info, "cuda")], []
