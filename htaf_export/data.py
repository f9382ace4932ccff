"""Input data: the bundled digits set, and user arrays from .npz files."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

from .errors import BadInput
from .signature import as_shapes

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.25


@dataclass
class Dataset:
    """Inputs shaped as the model expects (batch first, float32), with labels when known."""

    x: np.ndarray | tuple[np.ndarray, ...]  # one array per model input when there are several
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


Inputs = np.ndarray | tuple[np.ndarray, ...]  # one array, or one per model input (batch first)


def count(x: Inputs) -> int:
    return len(x[0]) if isinstance(x, tuple) else len(x)


def sliced(x: Inputs, start: int, stop: int) -> Inputs:
    return tuple(a[start:stop] for a in x) if isinstance(x, tuple) else x[start:stop]


class Batches(Protocol):
    """Samples read in batches: ``len``, a description, the first few inputs, and ``batches(size)``."""

    source: str

    def __len__(self) -> int: ...

    def head(self, n: int) -> Inputs: ...

    def batches(self, size: int) -> Iterator[tuple[Inputs, np.ndarray | None]]: ...


class ArrayBatches:
    """A ``Dataset`` already in memory."""

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self.source = data.source

    def __len__(self) -> int:
        return count(self.data.x)

    def head(self, n: int) -> Inputs:
        return sliced(self.data.x, 0, n)

    def batches(self, size: int) -> Iterator[tuple[Inputs, np.ndarray | None]]:
        for i in range(0, len(self), size):
            y = self.data.y[i:i + size] if self.data.y is not None else None
            yield sliced(self.data.x, i, i + size), y


def _members(path: Path, names: Sequence[str]) -> list[str]:
    """The archive member holding each input: ``x`` for a single input (or the only array); for several,
    each input's own name, else ``x0``, ``x1``, …"""
    with zipfile.ZipFile(path) as z:
        found = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    if len(names) == 1:
        if "x" in found:
            return ["x.npy"]
        if len(found) == 1 and found[0] != "y":  # 'y' is labels, never the inputs
            return [found[0] + ".npy"]
        raise BadInput(f"data file {path} must hold the inputs under key 'x' (found {', '.join(found) or 'nothing'})")
    members = []
    for k, name in enumerate(names):
        key = name if name in found else f"x{k}" if f"x{k}" in found else None
        if key is None:
            raise BadInput(f"data file {path} must hold input {k} under key {name!r} or 'x{k}' "
                           f"(found {', '.join(found) or 'nothing'})")
        members.append(key + ".npy")
    return members


def _read_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(f)
    if not np.issubdtype(dtype, np.number) or dtype.hasobject:
        raise BadInput(f"data file {path}: inputs have dtype {dtype}, expected numbers")
    return tuple(int(d) for d in shape), dtype, bool(fortran)


def _readable(path: Path):
    """One clear error for archives that are not .npz files."""
    if not path.is_file():
        raise BadInput(f"data file {path} {'is a directory, not an .npz file' if path.is_dir() else 'does not exist'}")
    return (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError)


def _unreadable(path: Path, e: Exception) -> BadInput:
    what = "it is not a zip archive (.npz)" if isinstance(e, zipfile.BadZipFile) else str(e).splitlines()[0][:120]
    return BadInput(f"data file {path} is not a readable .npz archive: {what}")


class NpzBatches:
    """Inputs (and labels ``y``) of an .npz archive, read batch by batch from the archive.

    One member per model input (see ``_members``). Only the labels (one integer per sample) are held in
    memory; the inputs are decoded from their members one batch at a time, whether the archive is
    stored or compressed.
    """

    def __init__(self, path: str | Path, input_shape: Sequence[int] | Sequence[Sequence[int]],
                 names: Sequence[str] = ("input",)) -> None:
        self.path = Path(path)
        self.shapes = as_shapes(input_shape)
        self.source = str(self.path)
        errors = _readable(self.path)
        try:
            self.members = _members(self.path, list(names)[:len(self.shapes)] if len(self.shapes) > 1 else ["input"])
            with zipfile.ZipFile(self.path) as z:
                headers = []
                for member, shape in zip(self.members, self.shapes):
                    with z.open(member) as f:
                        headers.append(self._check(_read_header(f, self.path), shape))
                y = None
                if "y.npy" in z.namelist() and "y.npy" not in self.members:
                    with z.open("y.npy") as f:
                        y = np.lib.format.read_array(f, allow_pickle=False)
        except BadInput:
            raise
        except errors as e:
            raise _unreadable(self.path, e) from None
        counts = {h[0] for h in headers}
        if len(counts) != 1:
            raise BadInput(f"data file {self.path}: the inputs hold different numbers of samples ({sorted(counts)})")
        self.count = headers[0][0]
        self.dtypes = [h[1] for h in headers]
        self.fortran = [h[2] for h in headers]
        if y is not None:
            given = np.asarray(y)
            y = given.reshape(-1)
            whole = np.issubdtype(y.dtype, np.floating) and bool(np.all(np.isfinite(y) & (y == np.round(y))))
            if len(y) != self.count or not (np.issubdtype(y.dtype, np.integer) or whole):
                raise BadInput(f"data file {self.path}: labels 'y' must be {self.count} integers, got "
                               f"{list(given.shape)} of {y.dtype}")
            y = y.astype(np.int64)
            if len(y) and int(y.min()) < 0:
                raise BadInput(f"data file {self.path}: labels 'y' are class indices from 0, but one is "
                               f"{int(y.min())}: drop the rows without a class, or shift the labels")
        self.y = y

    def _check(self, header: tuple[tuple[int, ...], np.dtype, bool], shape: list[int]) -> tuple[int, np.dtype, bool]:
        found, dtype, fortran = header
        if len(found) < 1 or (found[0] and int(np.prod(found[1:])) != int(np.prod(shape))):
            swapped = len(found) >= 2 and [found[0], *found[2:]] == list(shape)  # [T, N, …] for [N, T, …]
            hint = "; the data looks time first: store it batch first (np.moveaxis(x, 1, 0))" if swapped else ""
            raise BadInput(f"data file {self.path}: inputs of shape {list(found)} do not fit the model input "
                           f"[batch, {', '.join(map(str, shape))}]{hint}")
        if found[0] == 0:
            raise BadInput(f"data file {self.path} holds no samples")
        _same_layout(self.path, list(found[1:]), list(shape))
        return found[0], dtype, fortran

    def __len__(self) -> int:
        return self.count

    def head(self, n: int) -> Inputs:
        return next(self.batches(n))[0]

    def _rows(self, z: zipfile.ZipFile, k: int, size: int) -> Iterator[np.ndarray]:
        member, shape, dtype = self.members[k], self.shapes[k], self.dtypes[k]
        with z.open(member) as f:
            _read_header(f, self.path)
            full = np.lib.format.read_array(z.open(member), allow_pickle=False) if self.fortran[k] else None
            row = int(np.prod(shape)) * dtype.itemsize
            for i in range(0, self.count, size):
                m = min(size, self.count - i)
                if full is not None:  # column-major data cannot be cut into rows from the stream
                    raw = np.ascontiguousarray(full[i:i + m])
                else:
                    buf = f.read(row * m)
                    if len(buf) != row * m:
                        raise BadInput(f"data file {self.path} is truncated")
                    raw = np.frombuffer(buf, dtype=dtype)
                x = raw.astype(np.float32).reshape(m, *shape)
                if not np.isfinite(x).all():
                    raise BadInput(f"data file {self.path}: inputs contain NaN or infinity")
                yield x

    def batches(self, size: int) -> Iterator[tuple[Inputs, np.ndarray | None]]:
        with zipfile.ZipFile(self.path) as z:
            streams = [self._rows(z, k, size) for k in range(len(self.members))]
            for i, xs in zip(range(0, self.count, size), zip(*streams)):
                yield (xs[0] if len(xs) == 1 else tuple(xs)), (self.y[i:i + size] if self.y is not None else None)


def npz_sample_shapes(path: str | Path, names: Sequence[str] = ("input",)) -> list[list[int]]:
    """The per-sample shape of each input of an .npz (see ``_members``), read from the headers."""
    path = Path(path)
    errors = _readable(path)
    try:
        members = _members(path, names)
        shapes = []
        with zipfile.ZipFile(path) as z:
            for member in members:
                with z.open(member) as f:
                    shapes.append(_read_header(f, path)[0])
    except BadInput:
        raise
    except errors as e:
        raise _unreadable(path, e) from None
    if any(len(shape) < 2 for shape in shapes):
        raise BadInput(f"data file {path}: inputs of shape {[list(s) for s in shapes]} have no per-sample dimensions")
    return [list(shape[1:]) for shape in shapes]


def as_batches(data: Dataset | Batches) -> Batches:
    return ArrayBatches(data) if isinstance(data, Dataset) else data


def load_npz(path: str | Path, input_shape: Sequence[int] | Sequence[Sequence[int]],
             names: Sequence[str] = ("input",)) -> Dataset:
    """Read all inputs (see ``NpzBatches``) and optional labels (``y``) of an .npz file."""
    source = NpzBatches(path, input_shape, names)
    parts = [x for x, _ in source.batches(65536)]
    if isinstance(parts[0], tuple):
        return Dataset(tuple(np.concatenate(a) for a in zip(*parts)), source.y, source.source)
    return Dataset(np.concatenate(parts), source.y, source.source)


def _same_layout(path: Path, sample: list[int], shape: list[int]) -> None:
    """Rows of as many values as the model's input are read in its shape when either is flat (8×8 images for an MLP
    that takes 64 values), or the same shape up to axes of size 1; another arrangement of several axes (channels
    last for a [C, H, W] model) would scramble every sample, so it is refused, with the transpose that fixes it."""
    if len(sample) <= 1 or len(shape) <= 1 or [d for d in sample if d != 1] == [d for d in shape if d != 1]:
        return
    hint = ""
    if sorted(sample) == sorted(shape) and len(sample) == len(shape):
        order = []
        for d in shape:  # the first unused axis of each size: exact for distinct sizes, a guess otherwise
            order.append(next(i for i, e in enumerate(sample) if e == d and i not in order))
        hint = f"; if its axes are only in another order, store np.transpose(x, {tuple([0] + [i + 1 for i in order])})"
    raise BadInput(f"data file {path}: samples shaped {sample} are not the model input's {shape}, and reading them "
                   f"in that shape would scramble them{hint}")
