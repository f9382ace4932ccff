"""Helpers for the tests that compare a sharded validation (--workers, --ray) with a one-process one."""

from __future__ import annotations

import json
from pathlib import Path

from htaf_export import cli


def counts(report: dict) -> dict:
    """The report without timings (the only part that may differ between runs)."""
    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in ("seconds", "inference_seconds")}
        if isinstance(d, list):
            return [strip(v) for v in d]
        return d
    return strip(report)


def validate_cli(capsys, model: Path, artifact: Path, out: Path, *extra: str) -> tuple[int, dict]:
    """``htaf-export validate`` on the CPU with a JSON report: (exit code, the report)."""
    rc = cli.main(["validate", str(model), str(artifact), "--device", "cpu", "--report", str(out), *extra])
    capsys.readouterr()
    return rc, json.loads(out.read_text())
