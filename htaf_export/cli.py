"""Command line: ``htaf-export MODEL --target T``, ``htaf-export inspect MODEL``, ``htaf-export validate MODEL ARTIFACT``.

A thin adapter: argparse → typed calls of the library API (``pipeline``) → console rendering (``console``).
Exit codes: 0 success, 1 parity failure, 2 bad usage or bad input (one line on stderr, no traceback),
3 an internal error (a bug; HTAF_EXPORT_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from . import metadata as md
from .errors import BadInput, HtafExportError
from .targets import LCE_KERNEL_CHOICES, SNN_MODES, TARGETS


def _shape(text: str) -> list[int]:
    try:
        shape = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 1,8,8, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes such as 1,8,8, got {text!r}")
    return shape


def _sign_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sign-as-step", action="store_true",
                   help="read torch.sign of a computed tensor as a ±1 step (sign(0) = +1 with the ge tie rule, as "
                        "larq and LCE do; PyTorch gives 0) so that the layers it feeds are binary")


def _input_shape_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", type=_shape, metavar="C,H,W", action="append",
                   help="per-sample input shape, no batch, once per input (needed only when neither --data nor "
                        "the file says it)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{message} (see {self.prog} --help)")


def _export_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="htaf-export", description="Harden an HTAF-trained model, export it, and prove parity. "
                "Other commands: 'htaf-export inspect MODEL', 'htaf-export validate MODEL ARTIFACT'.")
    p.add_argument("model", help="model file: htaf-export checkpoint, TorchScript, .pt2, or pickle (--trust-pickle)")
    p.add_argument("--target", required=True, choices=list(TARGETS), help="artifact to produce")
    p.add_argument("-o", "--output", help="artifact path, or a folder (default: beside the model)")
    p.add_argument("--data", type=Path, help=".npz with inputs 'x' (and labels 'y') for validation")
    p.add_argument("--tie", choices=("ge", "gt"), help="value at exactly the threshold: ge fires (default), gt not")
    _sign_option(p)
    p.add_argument("--no-validate", action="store_true", help="skip the parity check after export")
    p.add_argument("--report", type=Path, help="write the parity report to FILE.json or FILE.html")
    p.add_argument("--portable", action="store_true", help="onnx: standard ops only, no htaf functions")
    p.add_argument("--snn-mode", choices=SNN_MODES, default="unrolled",
                   help="onnx: export a spiking model unrolled over T steps, or one step with state in/out")
    p.add_argument("--lce-kernel", choices=LCE_KERNEL_CHOICES, default="auto",
                   help="tflite: the LCE kernel the file recommends (auto: indirect-bgemm, see the README)")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all", help="backends to validate on")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickled nn.Module (unpickling runs code)")
    _input_shape_option(p)
    _tolerance_options(p)
    _workers_option(p)
    return p


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of processes, at least 1 (not {text!r})")
    return n


def _workers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_workers, metavar="N",
                   help="validate in N processes (each loads the model and the runtimes; pays on long validations, "
                        "e.g. the LCE interpreter, which runs one sample at a time); with --ray, N Ray actors "
                        "(default: one per CPU of the cluster)")


def _tolerance_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atol", type=float, help="fixed absolute tolerance for float tensors (default: derived from "
                   "float32 rounding bounds, see docs/tolerances.md; else 1e-5)")
    p.add_argument("--rtol", type=float, help="fixed relative tolerance for float tensors (else 1e-5)")
    p.add_argument("--flip-margin", type=float,
                   help="fixed margin: a flipped bit is explained when |pre-activation − threshold| is within it "
                        "(default: twice its rounding bound; else 1e-4)")


def _inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="htaf-export inspect", description="Show a model's family, step sites, binary layers and "
                "the bits its parameters need; with --data, the hardening gap. For a .nir file: its nodes, "
                "neuron parameters and the model sites they came from.")
    p.add_argument("model")
    p.add_argument("--data", type=Path, help=".npz with inputs 'x' (and labels 'y'): measures the hardening gap")
    p.add_argument("--tie", choices=("ge", "gt"), help="tie rule for sites that declare none")
    _sign_option(p)
    p.add_argument("--trust-pickle", action="store_true")
    _input_shape_option(p)
    return p


def _validate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="htaf-export validate", description="Compare an artifact with the hardened model.")
    p.add_argument("model")
    p.add_argument("artifact", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--tie", choices=("ge", "gt"))
    _sign_option(p)
    p.add_argument("--report", type=Path, help="write the parity report to FILE.json or FILE.html")
    p.add_argument("--trust-pickle", action="store_true")
    _input_shape_option(p)
    _tolerance_options(p)
    _workers_option(p)
    p.add_argument("--ray", metavar="ADDRESS", help="validate on a Ray cluster (host:port of its head); "
                   "needs pip install 'htaf-export[distributed]'")
    return p


def _tolerance(args: argparse.Namespace):
    """Defaults, overridden by --atol / --rtol / --flip-margin where the command line has them."""
    from .parity import Tolerance

    given = {}
    for name in ("atol", "rtol", "flip_margin"):
        value = getattr(args, name, None)
        if value is not None:
            if not (value >= 0 and value != float("inf")):
                raise BadInput(f"--{name.replace('_', '-')} must be a non-negative number, got {value}")
            given[name] = float(value)
    return Tolerance(**given, derived=not given)  # a fixed tolerance given overrides the derived ones


def _check_report_arg(path: Path | None) -> None:
    if path is not None:
        from .files import check_writable
        from .report import check_report_path

        check_report_path(path)
        check_writable(path)


def run_inspect(argv: Sequence[str]) -> int:
    args = _inspect_parser().parse_args(argv)
    from rich.console import Console

    if args.model.endswith(".nir"):
        from .inspect_nir import render_nir

        render_nir(Path(args.model), Console())
        return 0
    if args.model.endswith((".onnx", ".tflite")):
        from .inspect_artifact import render_artifact

        render_artifact(Path(args.model), Console())
        return 0
    from . import io
    from .data import load_npz
    from .inspect import render, summarize

    loaded = io.resolve(io.load(args.model, trust_pickle=args.trust_pickle), args.input_shape, args.data)
    data = load_npz(args.data, loaded.input_shapes, loaded.input_names or ("input",)) if args.data is not None else None
    render(summarize(loaded, data, tie=args.tie, recommend_target=True, sign_as_step=args.sign_as_step), Console())
    return 0


def run_export(argv: Sequence[str]) -> int:
    args = _export_parser().parse_args(argv)
    if args.no_validate and args.report:
        raise BadInput("--report writes the parity report, and --no-validate skips parity: drop one of them")
    if args.portable and args.target != "onnx":
        raise BadInput(f"--portable is for --target onnx (standard ops instead of htaf functions); {args.target} "
                       f"files have their own ops: drop --portable")
    _check_report_arg(args.report)
    tolerance = _tolerance(args)
    from rich.console import Console

    from . import console as out
    from .pipeline import export
    from .report import write_report

    console = Console()
    with out.progress_bar() as progress:
        result = export(args.model, args.target, args.output, tie=args.tie, data=args.data,
                        input_shape=args.input_shape,
                        validate_artifact=not args.no_validate, portable=args.portable, snn_mode=args.snn_mode,
                        lce_kernel=args.lce_kernel, trust_pickle=args.trust_pickle, device=args.device,
                        tolerance=tolerance, progress=progress, workers=args.workers,
                        recommend=not args.no_validate,  # an export that validates can spare a second for it
                        sign_as_step=args.sign_as_step)
    out.print_export(result, console)
    if result.report is None:
        return 0
    out.print_report(result.report, console)
    if args.report is not None:
        write_report(result.report, args.report, result)
        console.print(f"report written to {args.report}")
    if result.report.failure_line() is not None:  # complete, but it computes something else: kept, to inspect
        console.print(f"the artifact is kept for inspection: {result.artifact}", soft_wrap=True)
    return out.verdict(result.report, console)


def run_validate(argv: Sequence[str]) -> int:
    args = _validate_parser().parse_args(argv)
    _check_report_arg(args.report)
    tolerance = _tolerance(args)
    from rich.console import Console

    from . import console as out
    from .harden import harden, record_every_step
    from .io import load, resolve
    from .pipeline import default_data, recipe_of, validate_file
    from .report import write_report
    from .runtimes import read_artifact

    console = Console()
    loaded = resolve(load(args.model, trust_pickle=args.trust_pickle), args.input_shape, args.data)
    info = read_artifact(args.artifact)
    dataset = default_data(loaded.input_shapes, args.data, loaded.input_names or ("input",))
    # The reference follows the declared rule (--tie, else the model's own), never the artifact's:
    # an artifact built with another rule must fail on inputs that land on a threshold.
    hardened = harden(loaded.module, tie=args.tie, input_shapes=loaded.input_shapes, sign_as_step=args.sign_as_step)
    hardening = record_every_step(hardened, loaded.input_shapes,
                                  [s.site for s in info.steps])
    with out.progress_bar() as progress:
        report = validate_file(hardening, info, dataset, str(loaded.path), args.device, tolerance, progress=progress,
                               input_shape=loaded.input_shape if not loaded.extra_input_shapes
                               else loaded.input_shapes, workers=args.workers, ray=args.ray,
                               recipe=recipe_of(loaded, args.tie, [s.site for s in info.steps], args.sign_as_step))
    source = info.metadata.get(md.SOURCE_SHA256)
    if source and loaded.sha256 and source != loaded.sha256:
        report.notes.append(f"the artifact was exported from another file (sha256 {source[:12]}…) than this model "
                            f"({loaded.sha256[:12]}…): a failure may only mean that the two do not belong together")
    out.print_report(report, console)
    if args.report is not None:
        write_report(report, args.report)
        console.print(f"report written to {args.report}")
    return out.verdict(report, console)


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
    except Exception as e:  # noqa: BLE001 - the one boundary: a bug must still not dump a traceback on users
        if os.environ.get("HTAF_EXPORT_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"htaf-export: internal error: {type(e).__name__}: {first[:300]} "
              f"(set HTAF_EXPORT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
