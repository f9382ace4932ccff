"""Parity checks for users' own test suites.

    from htaf_export.testing import assert_parity

    def test_exported_model_matches():
        assert_parity("model.pt", "model.onnx")                 # bundled/generated data + crafted inputs
        assert_parity(model, "model.onnx", (x, y), atol=1e-4)   # your arrays, your tolerances

A failure raises ``AssertionError`` whose message names the backend, the first failing tensor in
graph order, the layer that feeds it, and what went wrong, so pytest shows it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import Batches, Dataset, NpzBatches
from .harden import harden
from .io import LoadedModel, load
from .validate import ParityReport, Tolerance

__all__ = ["assert_parity", "check_parity"]


def _loaded(model: str | Path | nn.Module | LoadedModel, trust_pickle: bool) -> tuple[nn.Module, list[int], str]:
    if isinstance(model, LoadedModel):
        return model.module, list(model.input_shape), str(model.path)
    if isinstance(model, (str, Path)):
        ld = load(model, trust_pickle=trust_pickle)
        return ld.module, list(ld.input_shape), str(ld.path)
    if isinstance(model, nn.Module):
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise TypeError(f"{type(model).__name__} has no input_shape attribute; set model.input_shape "
                            f"(without the batch dimension) or pass a model file")
        return model, [int(d) for d in shape], type(model).__name__
    raise TypeError(f"model must be a path, an nn.Module or a LoadedModel, not {type(model).__name__}")


def _data(data: Any, input_shape: list[int]) -> Dataset | Batches | None:
    if data is None:
        return None
    if isinstance(data, (Dataset, NpzBatches)):
        return data
    if isinstance(data, (str, Path)):
        return NpzBatches(data, input_shape)
    y = None
    if isinstance(data, tuple) and len(data) == 2:
        data, y = data
    x = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    x = x.astype(np.float32).reshape(len(x), *input_shape)
    if y is not None:
        y = (y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)).astype(np.int64).reshape(-1)
    return Dataset(x, y, f"arrays: {len(x)} samples")


def check_parity(model: str | Path | nn.Module | LoadedModel, artifact: str | Path, data: Any = None, *,
                 device: str = "cpu", tie: str | None = None, crafted: bool = True, trust_pickle: bool = False,
                 **tolerances: float) -> ParityReport:
    """Compare ``artifact`` with the hardened ``model`` and return the report (``report.passed``).

    ``model``: a model file, an ``nn.Module`` (with an ``input_shape`` attribute) or a ``LoadedModel``;
    smooth HTAF sites are hardened first. ``data``: None (the bundled digits for 64-input models, else
    generated inputs), an array or tensor of inputs, an ``(inputs, labels)`` pair, a ``Dataset`` or an
    .npz path. ``device``: "cpu" (default, deterministic for CI), "cuda" or "all". ``tie``: the
    declared tie rule, if not the model's own. ``tolerances``: ``atol``, ``rtol``, ``flip_margin``.
    """
    from .pipeline import default_data, validate_file
    from .runtimes import read_artifact

    unknown = set(tolerances) - {"atol", "rtol", "flip_margin"}
    if unknown:
        raise TypeError(f"unknown tolerance {', '.join(sorted(unknown))}; use atol, rtol or flip_margin")
    module, input_shape, name = _loaded(model, trust_pickle)
    hardening = harden(module, tie=tie)
    if not hasattr(hardening.model, "input_shape"):
        hardening.model.input_shape = input_shape  # type: ignore[attr-defined]
    batches = _data(data, input_shape)
    if batches is None:
        batches = default_data(input_shape, None)
    info = read_artifact(Path(artifact))
    return validate_file(hardening, info, batches, name, device, Tolerance(**tolerances), crafted=crafted)


def assert_parity(model: str | Path | nn.Module | LoadedModel, artifact: str | Path, data: Any = None,
                  **options: Any) -> ParityReport:
    """Like ``check_parity``, but raise ``AssertionError`` naming the backend and the first failing layer."""
    report = check_parity(model, artifact, data, **options)
    if not report.passed:
        raise AssertionError(report.failure_line())
    return report
