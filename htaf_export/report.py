"""Parity reports for machines (JSON) and people (HTML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BadInput
from .files import atomic_write_bytes
from .validate import ParityReport


def report_json(report: ParityReport, extra: dict[str, Any]) -> str:
    return json.dumps({**report.to_dict(), **extra}, indent=2, sort_keys=False, default=str)


def write_report(report: ParityReport, path: Path, extra: dict[str, Any]) -> None:
    if path.suffix == ".json":
        atomic_write_bytes(path, report_json(report, extra).encode())
    else:
        raise BadInput(f"report {path}: only .json reports are available in this version")
