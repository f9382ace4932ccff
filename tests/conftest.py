"""Shared fixtures: the bundled sample checkpoints, the digits test split, small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import htaf_export
from htaf_export import data

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "sample_models"
SAMPLE_NAMES = ["bnn_mlp", "bnn_cnn", "dhn_mlp", "snn_mlp", "icbm_cnn"]


@pytest.fixture(scope="session")
def sample_paths() -> dict[str, Path]:
    """name -> path of each bundled sample checkpoint (they must all be there)."""
    paths = {name: SAMPLE_DIR / f"{name}.pt" for name in SAMPLE_NAMES}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    assert not missing, f"sample checkpoints missing: {missing}"
    return paths


@pytest.fixture(params=SAMPLE_NAMES)
def sample_name(request) -> str:
    return request.param


@pytest.fixture
def sample_path(sample_paths, sample_name) -> Path:
    return sample_paths[sample_name]


@pytest.fixture
def load_sample(sample_paths):
    """Load a fresh copy of a sample model (tests may modify what they get)."""

    def _load(name: str) -> htaf_export.LoadedModel:
        return htaf_export.load(sample_paths[name])

    return _load


_DIGITS_CACHE: dict[tuple, data.Dataset] = {}

# Samples the LCE and TFLite interpreters (batch 1) validate a bundled sample on: the first 600 of load_digits
# in `make test`, all 1,797 in `make test-all` (HTAF_FULL_MATRIX=1).
DIGITS_SAMPLES = 1797 if os.environ.get("HTAF_FULL_MATRIX") else 600


def digits_subset(sample: Path, folder: Path) -> Path:
    """An .npz of the first DIGITS_SAMPLES digits (x, y) shaped for the sample checkpoint at ``sample``."""
    path = folder / f"{sample.stem}.digits{DIGITS_SAMPLES}.npz"
    if not path.exists():
        whole = data.digits("all", htaf_export.load(sample).input_shape)
        np.savez(path, x=whole.x[:DIGITS_SAMPLES], y=whole.y[:DIGITS_SAMPLES])
    return path


@pytest.fixture(scope="session")
def digits_test():
    """Digits test split shaped for a model: ``digits_test(input_shape) -> (x, y)`` as tensors."""

    def _get(input_shape, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(input_shape)
        if key not in _DIGITS_CACHE:
            _DIGITS_CACHE[key] = data.digits("test", list(input_shape))
        ds = _DIGITS_CACHE[key]
        x, y = torch.from_numpy(ds.x.copy()), torch.from_numpy(ds.y.copy())
        return (x[:n], y[:n]) if n is not None else (x, y)

    return _get


@pytest.fixture
def npz_file(tmp_path):
    """Write arrays to an .npz in tmp_path: ``npz_file(name, **arrays) -> Path``."""

    def _write(name: str = "data.npz", **arrays) -> Path:
        path = tmp_path / name
        np.savez(path, **arrays)
        return path

    return _write


def outputs_equal(a, b) -> bool:
    """Exact equality of model outputs, which may be a tensor or a tuple of tensors."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    return isinstance(b, torch.Tensor) and torch.equal(a, b)


def tie_twin(name: str, tie: str, directory: Path) -> Path:
    """A checkpoint of sample ``name`` with the same weights whose sites declare ``tie``."""
    loaded = htaf_export.load(SAMPLE_DIR / f"{name}.pt")
    model = htaf_export.models.build(loaded.arch, {**loaded.config, "tie": tie})
    model.load_state_dict(loaded.module.state_dict())
    return htaf_export.save(model, directory / f"{name}_{tie}.pt")


def save_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``model`` saved the way a user saves it: torch.export with a free batch dimension."""
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def save_as_user(model: torch.nn.Module, example: torch.Tensor, path: Path, fmt: str) -> Path:
    """``model`` saved as a ``.pt2`` (``fmt`` "pt2") or a TorchScript trace (any other), warnings silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            return save_pt2(model, example, path)
        torch.jit.save(torch.jit.trace(model, example), str(path))
    return path


def with_trained_norms(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with batch-norm statistics as training leaves them (means in [−1, 1], variances in
    [0.5, 2]), drawn in module order: random weights alone give every step a threshold of 0."""
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    return model.eval()
