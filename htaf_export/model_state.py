"""Runs of the user's model that must leave it as it was. snnTorch neurons keep their last membrane in a
buffer (``lif.mem``) sized to the last batch: after a probe at batch 2, torch.export would fix that size
into the program (a file that takes batch 2 only). The buffers are put back after each such run."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Run the block, then give every submodule back the buffer objects it had before (a TorchScript module
    keeps its own state and is left alone)."""
    if isinstance(model, torch.jit.ScriptModule):
        yield
        return
    saved = [(owner, dict(owner._buffers)) for owner in model.modules()]
    try:
        yield
    finally:
        for owner, buffers in saved:
            owner._buffers.clear()
            owner._buffers.update(buffers)
