"""A model file's zip archive read before torch reads it: damage that torch would load silently, and archives
that torch.jit left half-written, each named for what it is."""

from __future__ import annotations

import zipfile
from pathlib import Path

from .errors import BadInput

# zipfile raises NotImplementedError for a compression method it lacks, RuntimeError for an encrypted member.
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, NotImplementedError, RuntimeError, ValueError)


def members(path: Path) -> list[str]:
    """The archive's member names, once every member's bytes match their CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = _first_damaged_member(archive)
    except ZIP_ERRORS as e:  # a damaged directory
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"model file {path} is a corrupt archive: {msg[:200]}") from None
    if damaged is not None:
        raise BadInput(f"model file {path} is corrupt: archive member {damaged} fails its CRC-32 check")
    return names


def _first_damaged_member(archive: zipfile.ZipFile) -> str | None:
    """Name of the first member whose bytes do not match its recorded CRC-32, else None.

    torch's own reader does not check the CRCs, so a flipped byte in a weight tensor would
    otherwise load silently. Members written without a CRC (recorded as 0) are not checked.
    """
    for info in archive.infolist():
        if info.CRC == 0 or info.is_dir():
            continue
        try:
            with archive.open(info) as f:
                while f.read(1 << 20):
                    pass
        except zipfile.BadZipFile:
            return info.filename
    return None


def refuse_half_written_torchscript(path: Path, names: list[str]) -> None:
    """``torch.jit.save`` of a module TorchScript cannot compile (a Python ``autograd.Function``) raises after
    writing the weights: an archive whose pickle names TorchScript's ``__torch__`` classes and has no code."""
    data = next((n for n in names if n.endswith("/data.pkl")), None)
    with zipfile.ZipFile(path) as archive:
        if data is None or b"__torch__" not in archive.read(data):
            return
    raise BadInput(f"{path} is an incomplete TorchScript archive (weights, no code): torch.jit failed while "
                   f"saving it, often on a Python autograd.Function; save the model with torch.export as a .pt2")
