"""Input data: the bundled digits set, and user arrays from .npz files."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInput

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.25


@dataclass
class Dataset:
    """Inputs shaped as the model expects (batch first, float32), with labels when known."""

    x: np.ndarray
    y: np.ndarray | None
    source: str


def digits(split: str = "test", input_shape: list[int] | None = None) -> Dataset:
    """sklearn's 8x8 digits (bundled, offline), scaled to [0, 1], with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    if split != "all":
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=DIGITS_TEST_FRACTION,
                                                  random_state=DIGITS_SEED, stratify=y)
        x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    if input_shape is not None:
        x = x.reshape(len(x), *input_shape)
    return Dataset(x, y, f"digits:{split}")


def load_npz(path: str | Path, input_shape: list[int]) -> Dataset:
    """Read inputs (key ``x``, or the only array) and optional labels (``y``) from an .npz file."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy file gives a bare array
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise BadInput(f"data file {path} is not a readable .npz archive: {str(e).splitlines()[0][:120]}") from None
    if "x" in arrays:
        x = arrays["x"]
    elif len(arrays) == 1:
        x = next(iter(arrays.values()))
    else:
        raise BadInput(f"data file {path} must hold the inputs under key 'x' (found {', '.join(arrays) or 'nothing'})")
    y = arrays.get("y")
    if not np.issubdtype(x.dtype, np.number):
        raise BadInput(f"data file {path}: inputs have dtype {x.dtype}, expected numbers")
    expected = int(np.prod(input_shape))
    if x.ndim < 1 or (len(x) and x[0].size != expected):
        raise BadInput(f"data file {path}: inputs of shape {list(x.shape)} do not fit the model input "
                       f"[batch, {', '.join(map(str, input_shape))}]")
    if len(x) == 0:
        raise BadInput(f"data file {path} holds no samples")
    x = x.astype(np.float32).reshape(len(x), *input_shape)
    if not np.isfinite(x).all():
        raise BadInput(f"data file {path}: inputs contain NaN or infinity")
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise BadInput(f"data file {path}: labels 'y' must be {len(x)} integers, got {list(y.shape)} of {y.dtype}")
        y = y.astype(np.int64)
    return Dataset(x, y, str(path))
