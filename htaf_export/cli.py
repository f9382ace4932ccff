"""Command line: ``htaf-export MODEL --target T``, ``htaf-export inspect MODEL``, ``htaf-export validate MODEL ARTIFACT``.

Exit codes: 0 success, 1 parity failure, 2 bad usage or bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .errors import BadInput, HtafExportError

TARGETS = ("onnx", "tflite", "tflite-float")
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "tflite-float": ".float.tflite"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{message} (see {self.prog} --help)")


def _export_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="htaf-export", description="Harden an HTAF-trained model, export it, and prove parity. "
                "Other commands: 'htaf-export inspect MODEL', 'htaf-export validate MODEL ARTIFACT'.")
    p.add_argument("model", help="model file: htaf-export checkpoint, TorchScript, .pt2, or pickle (--trust-pickle)")
    p.add_argument("--target", required=True, choices=TARGETS, help="artifact to produce")
    p.add_argument("-o", "--output", type=Path, help="artifact path (default: beside the model)")
    p.add_argument("--data", type=Path, help=".npz with inputs 'x' (and labels 'y') for validation")
    p.add_argument("--tie", choices=("ge", "gt"), help="value at exactly the threshold: ge fires (default), gt not")
    p.add_argument("--no-validate", action="store_true", help="skip the parity check after export")
    p.add_argument("--report", type=Path, help="write the parity report to FILE.json or FILE.html")
    p.add_argument("--portable", action="store_true", help="onnx: standard ops only, no htaf functions")
    p.add_argument("--snn-mode", choices=("unrolled", "streaming"), default="unrolled",
                   help="onnx: export a spiking model unrolled over T steps, or one step with state in/out")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all", help="backends to validate on")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickled nn.Module (unpickling runs code)")
    _tolerance_options(p)
    return p


def _tolerance_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atol", type=float, help="absolute tolerance for float tensors (default 1e-5)")
    p.add_argument("--rtol", type=float, help="relative tolerance for float tensors (default 1e-5)")
    p.add_argument("--flip-margin", type=float,
                   help="a flipped bit is explained when |pre-activation − threshold| is within this (default 1e-4)")


def _inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="htaf-export inspect", description="Show a model's family, step sites, binary layers and "
                "the bits its parameters need; with --data, the hardening gap.")
    p.add_argument("model")
    p.add_argument("--data", type=Path, help=".npz with inputs 'x' (and labels 'y'): measures the hardening gap")
    p.add_argument("--trust-pickle", action="store_true")
    return p


def _validate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="htaf-export validate", description="Compare an artifact with the hardened model.")
    p.add_argument("model")
    p.add_argument("artifact", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--tie", choices=("ge", "gt"))
    p.add_argument("--report", type=Path, help="write the parity report to FILE.json or FILE.html")
    p.add_argument("--trust-pickle", action="store_true")
    _tolerance_options(p)
    return p


def _load_data(path: Path | None, input_shape: list[int]):
    if path is None:
        return None
    from .data import load_npz

    return load_npz(path, input_shape)


def run_inspect(argv: Sequence[str]) -> int:
    args = _inspect_parser().parse_args(argv)
    from rich.console import Console

    from . import io
    from .inspect import render, summarize

    loaded = io.load(args.model, trust_pickle=args.trust_pickle)
    render(summarize(loaded, _load_data(args.data, loaded.input_shape)), Console())
    return 0


def run_export(argv: Sequence[str]) -> int:
    args = _export_parser().parse_args(argv)
    if args.report is not None and args.report.suffix not in (".json", ".html"):
        raise BadInput(f"--report must end in .json or .html, got {args.report}")
    from .pipeline import export_command

    return export_command(args)


def run_validate(argv: Sequence[str]) -> int:
    args = _validate_parser().parse_args(argv)
    from .pipeline import validate_command

    return validate_command(args)


COMMANDS = {"inspect": run_inspect, "validate": run_validate}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    command = COMMANDS.get(argv[0], run_export) if argv else run_export
    if command is not run_export:
        argv = argv[1:]
    try:
        return command(argv)
    except HtafExportError as e:
        print(f"htaf-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("htaf-export: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug must still not dump a traceback on users by default
        if os.environ.get("HTAF_EXPORT_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"htaf-export: internal error: {type(e).__name__}: {first[:300]} "
              f"(set HTAF_EXPORT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
