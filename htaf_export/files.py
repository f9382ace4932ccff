"""Output files are complete and valid or not there at all: write to a temporary file, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import BadInput


def check_writable(path: Path) -> None:
    """Fail early, before any work, when ``path`` cannot be created."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise BadInput(f"output path {path} is a directory")
    if not parent.is_dir():
        what = "is a file, not a directory" if parent.exists() else "does not exist"
        raise BadInput(f"cannot write {path}: {parent} {what}")
    if not os.access(parent, os.W_OK):
        raise BadInput(f"cannot write {path}: directory {parent} is not writable")


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    If ``write`` raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    check_writable(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent or Path("."))
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600; give the artifact the permissions an ordinary new file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in _FILE_SYSTEM_ERRORS:  # disk full, quota, read-only or failing file system: not our bug
            raise BadInput(f"cannot write {path}: {e.strerror}") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


_FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.EFBIG}


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def silenced(fd: int, into: str = os.devnull) -> Iterator[None]:
    """Send what native code writes straight to file descriptor ``fd`` (1 or 2), past Python's streams, to the
    file ``into`` (by default nowhere)."""
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    try:
        with open(into, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
