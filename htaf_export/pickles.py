"""Trusted pickles: loaded with class lookup as in ``python`` run from here, and honest about missing classes."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import BadInput


@contextlib.contextmanager
def current_directory_importable() -> Iterator[None]:
    """Class lookup as in ``python`` run from here: the current directory is importable (a console script
    puts its own bin directory first instead). Appended, so local files never shadow installed packages."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


_MISSING_CLASS = re.compile(r"Can't get attribute '([\w.]+)' on <module '([\w.]+)'")


def unpickle(path: Path) -> Any:
    """``torch.load`` of a trusted pickle; a class that cannot be imported is one clear line, not "corrupt"."""
    try:
        with current_directory_importable():
            return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        where = f"module {e.name!r}"
        raise BadInput(_missing_class_message(path, where)) from None
    except AttributeError as e:
        found = _MISSING_CLASS.search(str(e))
        if found is None:
            raise
        module = found.group(2)
        main = getattr(sys.modules.get("__main__"), "__spec__", None)
        if main is not None and main.name == module:  # run as ``python -m``: the pickle's __main__ is this one
            module = "__main__"
        raise BadInput(_missing_class_message(path, f"class {found.group(1)!r} of module {module!r}")) from None


def _missing_class_message(path: Path, what: str) -> str:
    main = "'__main__'" in what
    fix = ("it was defined in the training script itself (__main__): move the class to a module of its own"
           if main else "make that module importable (run from its directory, or add it to PYTHONPATH)")
    return (f"{path} is a pickled model whose {what} cannot be imported; {fix}, or save it as a torch.export "
            f"program, which needs no Python class: htaf_export.save(model.eval(), 'model.pt2', "
            f"input_shape=(...))  (one sample's shape, no batch)")
