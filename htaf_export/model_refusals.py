"""Why a model did not run on the inputs htaf-export feeds it, said in one line with what fixes it."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .errors import BadInput
from .model_state import buffers_kept

SHAPE_HELP = ("pass --input-shape (per sample, no batch, e.g. 1,8,8; once per input), or --data FILE.npz with "
              "inputs 'x', or save the model with htaf_export.save or torch.export, which record it")


def does_not_run(module: nn.Module, path: Path, shapes: list[list[int]], e: Exception) -> BadInput:
    """Why the model did not run on zeros of ``shapes``, and what to do about it, in one line."""
    first = _cause(e)
    if re.search(r"'indices' to have one of the following scalar types|expected scalar type (Long|Int)", str(e)):
        return BadInput(f"{path}: the model takes integer inputs (token ids for an nn.Embedding?); "
                        f"htaf-export feeds float inputs only: export the layers after the embedding, and "
                        f"feed them its output")
    integer = re.search(r"dtype mismatch! Expected: (Byte|Char|Short|Int|Long|Bool)", str(e))
    if integer:
        kind = {"Byte": "uint8", "Char": "int8", "Short": "int16", "Int": "int32", "Long": "int64"}.get(
            integer.group(1), "bool")
        return BadInput(f"{path}: the model takes {kind} inputs; htaf-export feeds float32 inputs only: "
                        f"move the conversion (e.g. img.float() / 255) out of forward, into the data pipeline, "
                        f"and save the model that takes its result")
    other = _not_float32(module)
    if other:
        return BadInput(f"{path}: the model's weights are {other[1]} ({other[0]}, ...); every target computes "
                        f"in float32 and htaf-export feeds float32 inputs: save model.float() instead")
    given = "; ".join(f"[batch, {', '.join(map(str, shape))}]" for shape in shapes)
    if _runs_alone(module, shapes):
        return BadInput(f"{path}: the model runs on one sample at a time only (on {given} with batch 1, "
                        f"not 2: {first}); validation runs batches: write the batch as x.shape[0] where forward "
                        f"writes 1 (h.view(1, -1) → h.view(x.shape[0], -1))")
    help_ = SHAPE_HELP
    if isinstance(module, torch.jit.ScriptModule) and "at dimension 0" in str(e):
        help_ = ("TorchScript sources are read batch first: a time-first model ([T, N, ...]) saves as a .pt2 "
                 "with its batch on axis 1 (dynamic_shapes=({1: torch.export.Dim('batch')},)) or a pickle")
    return BadInput(f"{path}: the model does not run on inputs of shape {given} ({first}); {help_}")


def _runs_alone(module: nn.Module, shapes: list[list[int]]) -> bool:
    try:
        with torch.no_grad(), buffers_kept(module):
            module(*(torch.zeros(1, *shape) for shape in shapes))
    except Exception:  # noqa: BLE001 - only whether it runs
        return False
    return True


def _not_float32(module: nn.Module) -> tuple[str, str] | None:
    """(name, dtype) of a floating parameter or buffer that is not float32 (model.double(), model.half())."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            return name, str(tensor.dtype).removeprefix("torch.")
    return None


def _cause(error: Exception) -> str:
    """One line on why the model raised: TorchScript puts its own sentence first and the cause last."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[-1] if "TorchScript interpreter" in lines[0] and len(lines) > 1 else lines[0]
    return f"{type(error).__name__}: {line}"[:200] if not isinstance(error, RuntimeError) else line[:200]
