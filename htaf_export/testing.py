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
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .data import Batches, Dataset, NpzBatches
from .errors import BadInput
from .harden import harden, record_every_step
from .io import LoadedModel, load, resolve
from .parity import ParityReport, Tolerance

__all__ = ["assert_parity", "check_parity"]


def _shape_of(data: Any) -> list[int] | None:
    """Per-sample shape of in-memory data (arrays, tensors, an (inputs, labels) pair, a Dataset)."""
    if isinstance(data, Dataset):
        return list(data.x.shape[1:])
    if isinstance(data, tuple) and len(data) == 2:
        data = data[0]
    if isinstance(data, (torch.Tensor, np.ndarray)) and data.ndim >= 2:
        return [int(d) for d in data.shape[1:]]
    return None


def _loaded(model: str | Path | nn.Module | LoadedModel, trust_pickle: bool, data: Any,
            input_shape: Sequence[int] | Sequence[Sequence[int]] | None) -> tuple[nn.Module, list[list[int]], list[str], str]:
    npz = Path(data) if isinstance(data, (str, Path)) else None
    shape = list(input_shape) if input_shape is not None else _shape_of(data)
    if isinstance(model, (str, Path)):
        model = load(model, trust_pickle=trust_pickle)
    if isinstance(model, nn.Module):
        declared = getattr(model, "input_shape", None)
        model = LoadedModel(model, [int(d) for d in declared] if declared is not None else None, "pickle",
                            Path(type(model).__name__), "")
    if not isinstance(model, LoadedModel):
        raise TypeError(f"model must be a path, an nn.Module or a LoadedModel, not {type(model).__name__}")
    ld = resolve(model, shape, npz)
    return ld.module, ld.input_shapes, list(ld.input_names or ["input"]), str(ld.path)


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
                 input_shape: Sequence[int] | None = None, **tolerances: float) -> ParityReport:
    """Compare ``artifact`` with the hardened ``model`` and return the report (``report.passed``).

    ``model``: a model file, an ``nn.Module`` or a ``LoadedModel``; smooth HTAF sites are hardened first.
    Its per-sample input shape comes from ``input_shape``, else ``data``, else the model (file or attribute). ``data``: None (the bundled digits for 64-input models, else
    generated inputs), an array or tensor of inputs, an ``(inputs, labels)`` pair, a ``Dataset`` or an
    .npz path. ``device``: "cpu" (default, deterministic for CI), "cuda" or "all". ``tie``: the
    declared tie rule, if not the model's own. ``tolerances``: ``atol``, ``rtol``, ``flip_margin``.
    """
    from .pipeline import default_data, validate_file
    from .runtimes import read_artifact

    unknown = set(tolerances) - {"atol", "rtol", "flip_margin"}
    if unknown:
        raise TypeError(f"unknown tolerance {', '.join(sorted(unknown))}; use atol, rtol or flip_margin")
    negative = sorted(k for k, v in tolerances.items() if not float(v) >= 0)
    if negative:
        raise BadInput(f"tolerance {', '.join(negative)} must be a number ≥ 0")
    module, shapes, names, name = _loaded(model, trust_pickle, data, input_shape)
    shape = shapes[0] if len(shapes) == 1 else shapes
    info = read_artifact(Path(artifact))
    hardening = record_every_step(harden(module, tie=tie, input_shapes=shapes), shapes, [s.site for s in info.steps])
    if data is not None and len(shapes) > 1 and not isinstance(data, (str, Path, Dataset, NpzBatches)):
        raise BadInput(f"{name} takes {len(shapes)} inputs: pass data as an .npz path or a Dataset")
    batches = _data(data, shapes[0])
    if batches is None:
        batches = default_data(shapes, None, names)
    return validate_file(hardening, info, batches, name, device, Tolerance(**tolerances, derived=not tolerances),
                         crafted=crafted,
                         input_shape=shape)


def assert_parity(model: str | Path | nn.Module | LoadedModel, artifact: str | Path, data: Any = None,
                  **options: Any) -> ParityReport:
    """Like ``check_parity``, but raise ``AssertionError`` naming the backend and the first failing layer."""
    report = check_parity(model, artifact, data, **options)
    if not report.passed:
        raise AssertionError(report.failure_line())
    return report
