"""Errors that the command line turns into one line on stderr and an exit code."""

from __future__ import annotations


class HtafExportError(Exception):
    """Base of the errors users see; ``exit_code`` is what the command line returns."""

    exit_code = 2


class BadInput(HtafExportError):
    """A model file, data file, option or output path that cannot be used (exit code 2)."""


class UnsupportedLayer(BadInput):
    """A converter cannot express a layer exactly; names the layer and the reason."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"cannot convert layer {layer!r}: {reason}")
        self.layer = layer
        self.reason = reason


class ParityFailure(HtafExportError):
    """The artifact does not compute what the hardened reference computes (exit code 1)."""

    exit_code = 1
