"""Input data: the bundled digits set, and user arrays from .npz files."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

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


class Batches(Protocol):
    """Samples read in batches: ``len``, a description, the first few inputs, and ``batches(size)``."""

    source: str

    def __len__(self) -> int: ...

    def head(self, n: int) -> np.ndarray: ...

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]: ...


class ArrayBatches:
    """A ``Dataset`` already in memory."""

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self.source = data.source

    def __len__(self) -> int:
        return len(self.data.x)

    def head(self, n: int) -> np.ndarray:
        return self.data.x[:n]

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for i in range(0, len(self.data.x), size):
            y = self.data.y[i:i + size] if self.data.y is not None else None
            yield self.data.x[i:i + size], y


class NpzBatches:
    """Inputs ``x`` (and labels ``y``) of an .npz archive, read batch by batch from the archive.

    Only the labels (one integer per sample) are held in memory; the inputs are decoded from the
    archive member one batch at a time, whether the archive is stored or compressed.
    """

    def __init__(self, path: str | Path, input_shape: Sequence[int]) -> None:
        self.path = Path(path)
        self.shape = [int(d) for d in input_shape]
        self.source = str(self.path)
        path = self.path
        if not path.is_file():
            raise BadInput(f"data file {path} does not exist")
        try:
            with zipfile.ZipFile(path) as z:
                members = [n for n in z.namelist() if n.endswith(".npy")]
                names = [n[:-4] for n in members]
                if "x" in names:
                    self.member = "x.npy"
                elif len(names) == 1:
                    self.member = members[0]
                else:
                    raise BadInput(f"data file {path} must hold the inputs under key 'x' "
                                   f"(found {', '.join(names) or 'nothing'})")
                with z.open(self.member) as f:
                    count, dtype, fortran = self._header(f)
                y = None
                if "y" in names and self.member != "y.npy":
                    with z.open("y.npy") as f:
                        y = np.lib.format.read_array(f, allow_pickle=False)
        except BadInput:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
            what = "it is not a zip archive (.npz)" if isinstance(e, zipfile.BadZipFile) else str(e).splitlines()[0][:120]
            raise BadInput(f"data file {path} is not a readable .npz archive: {what}") from None
        self.count, self.dtype, self.fortran = count, dtype, fortran
        if y is not None:
            y = np.asarray(y).reshape(-1)
            if len(y) != count or not np.issubdtype(y.dtype, np.integer):
                raise BadInput(f"data file {path}: labels 'y' must be {count} integers, got {list(y.shape)} of {y.dtype}")
            y = y.astype(np.int64)
        self.y = y

    def _header(self, f) -> tuple[int, np.dtype, bool]:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        if not np.issubdtype(dtype, np.number) or dtype.hasobject:
            raise BadInput(f"data file {self.path}: inputs have dtype {dtype}, expected numbers")
        expected = int(np.prod(self.shape))
        if len(shape) < 1 or (shape[0] and int(np.prod(shape[1:])) != expected):
            raise BadInput(f"data file {self.path}: inputs of shape {list(shape)} do not fit the model input "
                           f"[batch, {', '.join(map(str, self.shape))}]")
        if shape[0] == 0:
            raise BadInput(f"data file {self.path} holds no samples")
        return int(shape[0]), dtype, bool(fortran)

    def __len__(self) -> int:
        return self.count

    def head(self, n: int) -> np.ndarray:
        return next(self.batches(n))[0]

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
            self._header(f)
            if self.fortran:  # column-major data cannot be cut into rows from the stream
                full = np.lib.format.read_array(z.open(self.member), allow_pickle=False)
            row = int(np.prod(self.shape)) * self.dtype.itemsize
            for i in range(0, self.count, size):
                m = min(size, self.count - i)
                if self.fortran:
                    raw = np.ascontiguousarray(full[i:i + m])
                else:
                    buf = f.read(row * m)
                    if len(buf) != row * m:
                        raise BadInput(f"data file {self.path} is truncated")
                    raw = np.frombuffer(buf, dtype=self.dtype)
                x = raw.astype(np.float32).reshape(m, *self.shape)
                if not np.isfinite(x).all():
                    raise BadInput(f"data file {self.path}: inputs contain NaN or infinity")
                yield x, (self.y[i:i + m] if self.y is not None else None)


def npz_sample_shape(path: str | Path) -> list[int]:
    """The per-sample shape of the inputs ``x`` (or the only array) of an .npz, read from its header."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            members = [n for n in z.namelist() if n.endswith(".npy")]
            member = "x.npy" if "x.npy" in members else (members[0] if len(members) == 1 else None)
            if member is None:
                raise BadInput(f"data file {path} must hold the inputs under key 'x' "
                               f"(found {', '.join(n[:-4] for n in members) or 'nothing'})")
            with z.open(member) as f:
                version = np.lib.format.read_magic(f)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, _, _ = reader(f)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        what = "it is not a zip archive (.npz)" if isinstance(e, zipfile.BadZipFile) else str(e).splitlines()[0][:120]
        raise BadInput(f"data file {path} is not a readable .npz archive: {what}") from None
    if len(shape) < 2:
        raise BadInput(f"data file {path}: inputs of shape {list(shape)} have no per-sample dimensions")
    return [int(d) for d in shape[1:]]


def as_batches(data: Dataset | Batches) -> Batches:
    return ArrayBatches(data) if isinstance(data, Dataset) else data


def load_npz(path: str | Path, input_shape: list[int]) -> Dataset:
    """Read all inputs (key ``x``, or the only array) and optional labels (``y``) of an .npz file."""
    source = NpzBatches(path, input_shape)
    xs = [x for x, _ in source.batches(65536)]
    return Dataset(np.concatenate(xs), source.y, source.source)
