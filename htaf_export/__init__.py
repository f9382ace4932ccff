"""htaf-export: harden HTAF-trained binary networks, export them to ONNX or TFLite, and prove parity."""

from __future__ import annotations

from typing import Any

from .errors import BadInput, HtafExportError, ParityFailure, UnsupportedLayer
from .harden import HardenResult, harden
from .io import LoadedModel, load, save
from . import validate as _validate_module  # noqa: F401  (imported first, so the function below keeps its name)

from .version import __version__  # noqa: E402


def export(*args: Any, **kwargs: Any) -> Any:
    """Harden, capture and convert a model to a target artifact, then validate it (``htaf_export.pipeline.export``)."""
    from .pipeline import export as _export

    return _export(*args, **kwargs)


def validate(model: Any, artifact: Any, data: Any = None, **options: Any) -> Any:
    """Compare ``artifact`` with the hardened ``model``; returns a ParityReport (see ``testing.check_parity``)."""
    from .testing import check_parity

    return check_parity(model, artifact, data, **options)


__all__ = [
    "load", "save", "harden", "export", "validate", "LoadedModel", "HardenResult",
    "BadInput", "HtafExportError", "ParityFailure", "UnsupportedLayer", "__version__",
]
