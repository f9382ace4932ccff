"""htaf-export: harden HTAF-trained binary networks, export them to ONNX or TFLite, and prove parity."""

from __future__ import annotations

from typing import Any

from .errors import BadInput, HtafExportError, ParityFailure, UnsupportedLayer
from .harden import HardenResult, harden
from .io import LoadedModel, load, save

__version__ = "0.1.0"


def export(*args: Any, **kwargs: Any) -> Any:
    """Harden, capture and convert a model to a target artifact (see ``htaf_export.pipeline.export``)."""
    from .pipeline import export as _export

    return _export(*args, **kwargs)


def validate(*args: Any, **kwargs: Any) -> Any:
    """Compare an artifact with the hardened reference (see ``htaf_export.validate.validate``)."""
    from .validate import validate as _validate

    return _validate(*args, **kwargs)


__all__ = [
    "load", "save", "harden", "export", "validate", "LoadedModel", "HardenResult",
    "BadInput", "HtafExportError", "ParityFailure", "UnsupportedLayer", "__version__",
]
