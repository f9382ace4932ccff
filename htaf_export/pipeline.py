"""The one-command pipeline: load → harden → capture → convert → write → validate → report."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from . import __version__
from .capture import Capture, capture
from .data import Batches, Dataset, NpzBatches, digits
from .errors import BadInput
from .files import atomic_write_bytes, check_writable
from .harden import HardenResult, harden
from .io import LoadedModel, load
from .reference import step_modules
from .runtimes import ArtifactInfo, backends_for, read_artifact
from .validate import ParityReport, Tolerance, validate

DEFAULT_SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "tflite-float": ".float.tflite"}
GENERATED_SAMPLES = 512


@dataclass
class LayerRow:
    """One line of the export summary: what a layer became in the artifact, and why."""

    layer: str
    became: str
    note: str = ""


@dataclass
class Converted:
    """A converter's output: the artifact bytes and what the summary shows about them."""

    data: bytes
    rows: list[LayerRow] = field(default_factory=list)
    binary_floor_bytes: float = 0.0
    binary_stored_bytes: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    artifact: Path
    target: str
    hardening: HardenResult
    converted: Converted
    report: ParityReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _metadata(loaded: LoadedModel, target: str, snn_mode: str) -> dict[str, Any]:
    return {
        "htaf_export.version": __version__,
        "htaf_export.target": target,
        "htaf_export.source_sha256": loaded.sha256,
        "htaf_export.source_format": loaded.source_format,
        "htaf_export.family": loaded.family,
        "htaf_export.arch": loaded.arch or "",
        "htaf_export.input_shape": loaded.input_shape,
        "htaf_export.snn_mode": snn_mode,
    }


def _convert_onnx(cap: Capture, meta: dict[str, Any], portable: bool) -> Converted:
    from .converters.onnx import OnnxOptions, convert

    art = convert(cap, meta, OnnxOptions(portable=portable))
    rows = [LayerRow(p.layer, "packed 1-bit weights", f"{p.numel:,} weights in {p.packed_bytes:,} B") for p in art.packed]
    rows += [LayerRow(s.tensor, f"htaf.{s.op}" if not portable else f"{s.op} (standard ops)", f"tie {s.tie}")
             for s in cap.steps]
    return Converted(art.serialized(), rows, art.binary_floor_bytes, art.binary_stored_bytes)


def _convert_tflite(cap: Capture, meta: dict[str, Any], target: str) -> Converted:
    from .converters.tflite import convert_for_pipeline

    return convert_for_pipeline(cap, meta, bitpacked=(target == "tflite"))


def default_data(loaded: LoadedModel, data_path: Path | None) -> Dataset | Batches:
    """The user's .npz (streamed batch by batch); else the bundled digits for models with digits-shaped
    input; else seeded noise from the input spec."""
    if data_path is not None:
        return NpzBatches(data_path, loaded.input_shape)
    if int(np.prod(loaded.input_shape)) == 64:
        return digits("all", loaded.input_shape)
    rng = np.random.default_rng(0)
    return Dataset(rng.standard_normal((GENERATED_SAMPLES, *loaded.input_shape)).astype(np.float32), None,
                   f"generated: {GENERATED_SAMPLES} standard normal samples (seed 0)")


def export(model: str | Path | LoadedModel, target: str, output: str | Path | None = None, *, tie: str | None = None,
           data: Path | None = None, validate_artifact: bool = True, portable: bool = False,
           snn_mode: str = "unrolled", trust_pickle: bool = False, device: str = "all",
           tolerance: Tolerance | None = None, progress: bool = False) -> ExportResult:
    """Export ``model`` to ``target`` ("onnx", "tflite", "tflite-float") and, unless told not to, validate it."""
    if target not in DEFAULT_SUFFIX:
        raise BadInput(f"unknown target {target!r}; choose one of {', '.join(DEFAULT_SUFFIX)}")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load(model, trust_pickle=trust_pickle)
    out = Path(output) if output is not None else loaded.path.with_suffix(DEFAULT_SUFFIX[target])
    if out.suffix != (".onnx" if target == "onnx" else ".tflite"):
        raise BadInput(f"output {out} must end in {'.onnx' if target == 'onnx' else '.tflite'} for target {target}")
    check_writable(out)
    dataset = default_data(loaded, data) if validate_artifact else None
    seconds["load"] = time.perf_counter() - start

    t = time.perf_counter()
    hardening = harden(loaded.module, tie=tie)
    seconds["harden"] = time.perf_counter() - t

    t = time.perf_counter()
    streaming = snn_mode == "streaming"
    cap = capture(hardening.model, loaded.input_shape, loaded.output_names, streaming=streaming)
    seconds["capture"] = time.perf_counter() - t

    t = time.perf_counter()
    meta = _metadata(loaded, target, snn_mode)
    if target == "onnx":
        converted = _convert_onnx(cap, meta, portable)
    else:
        if streaming:
            raise BadInput("--snn-mode streaming is available for --target onnx only")
        converted = _convert_tflite(cap, meta, target)
    seconds["convert"] = time.perf_counter() - t

    atomic_write_bytes(out, converted.data)
    result = ExportResult(out, target, hardening, converted, seconds=seconds)
    if validate_artifact and dataset is not None:
        t = time.perf_counter()
        result.report = validate_file(hardening, read_artifact(out), dataset, str(loaded.path), device, tolerance,
                                      progress=progress)
        seconds["validate"] = time.perf_counter() - t
    return result


@contextlib.contextmanager
def _progress_bar(enabled: bool):
    """A rich progress bar on stderr while validation runs (only on a terminal); yields the callback."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("validating"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("validate", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def validate_file(hardening: HardenResult, info: ArtifactInfo, data: Dataset | Batches, model_name: str,
                  device: str = "all", tolerance: Tolerance | None = None, *, progress: bool = False,
                  crafted: bool = True) -> ParityReport:
    """Validate an artifact against a hardened model on every backend this machine has for ``device``."""
    _check_artifact_fits(hardening, info)
    runners, skipped = backends_for(info, device, model=hardening.model)
    if not runners:
        why = "; ".join(f"{b}: {r}" for b, r in skipped)
        raise BadInput(f"no runtime on this machine can run {info.path} on device {device!r}" + (f" ({why})" if why else ""))
    with _progress_bar(progress) as update:
        return validate(hardening.model, info, runners, data, model_name, tolerance, crafted=crafted,
                        progress=update, skipped=skipped)


def _check_artifact_fits(hardening: HardenResult, info: ArtifactInfo) -> None:
    """Refuse (exit 2) an artifact that was not exported from this model: other input shape or other steps."""
    shape = info.metadata.get("htaf_export.input_shape")
    model_shape = getattr(hardening.model, "input_shape", None)
    if shape and model_shape is not None:
        try:
            artifact_shape = [int(d) for d in json.loads(shape)]
        except (ValueError, TypeError):
            artifact_shape = None
        if artifact_shape is not None and artifact_shape != [int(d) for d in model_shape]:
            raise BadInput(f"artifact {info.path} takes input {artifact_shape}, the model takes {list(model_shape)}: "
                           f"it was not exported from this model")
    sites = set(step_modules(hardening.model))
    if sites:
        missing = sorted({s.site for s in info.steps} - sites)
        if missing:
            raise BadInput(f"artifact {info.path} has step sites the model lacks ({', '.join(missing[:4])}): "
                           f"it was not exported from this model")


# ---- command-line front ends -------------------------------------------------------------------


def _print_export(result: ExportResult, console: Console) -> None:
    from rich.table import Table

    conv = result.converted
    table = Table(title=f"{result.artifact} ({result.target})", title_justify="left")
    for col in ("layer / tensor", "became", "note"):
        table.add_column(col)
    for row in conv.rows:
        table.add_row(row.layer, row.became, row.note)
    console.print(table)
    size = len(conv.data)
    line = f"artifact size {size:,} B"
    if conv.binary_floor_bytes:
        line += (f"; binary weights {conv.binary_stored_bytes:,} B stored vs 1-bit floor "
                 f"{conv.binary_floor_bytes:,.0f} B = {conv.binary_stored_bytes / conv.binary_floor_bytes:.3f}x")
    console.print(line)
    for note in conv.notes:
        console.print(f"note: {note}")
    console.print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))


def _count(n: int) -> str:
    return f"{n:,}"


def print_report(report: ParityReport, console: Console) -> None:
    """The parity summary: one row per backend, then the failing tensors, the crafted inputs and the verdict."""
    from rich.markup import escape
    from rich.table import Table

    crafted = report.crafted or {}
    from rich import box

    table = Table(title=f"Parity: {escape(report.inputs)} + {crafted.get('samples', 0)} crafted inputs",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, justify in (("backend", "left"), ("bad/expl. flips", "right"), ("max err", "right"),
                         ("argmax", "right"), ("accuracy", "right"), ("", "left")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for b in report.backends:
        flips = sum(t.unexplained for t in b.tensors if t.kind == "binary")
        explained = sum(t.explained for t in b.tensors if t.kind == "binary")
        err = max((t.max_abs_error for t in b.tensors if t.kind == "float"), default=0.0)
        acc = (f"{100 * b.reference_correct / b.labelled:.1f}→{100 * b.artifact_correct / b.labelled:.1f}%"
               if b.labelled else "-")
        table.add_row(b.backend, f"{_count(flips)}/{_count(explained)}", f"{err:.0e}",
                      f"{b.argmax_agree + b.argmax_explained}/{b.samples}", acc,
                      "[green]pass[/green]" if b.passed else "[red]FAIL[/red]")
    console.print(table)
    failing = [(b, t) for b in report.backends for t in b.tensors if not t.passed]
    if failing:
        console.print("failing tensors, in graph order:")
    for b, t in failing[:6]:
        fed = f" (fed by {t.layer})" if t.layer else ""
        what = (f"{_count(t.unexplained)} unexplained flip{'s' if t.unexplained != 1 else ''}"
                + (f", {_count(t.tie_violations)} on certified ties" if t.tie_violations else "")
                if t.kind == "binary" else f"{_count(t.mismatched)} values beyond tolerance")
        ex = t.examples[0] if t.examples else None
        example = (f"; e.g. {ex.inputs} #{ex.sample} unit {ex.unit}: reference {ex.reference:g}, artifact "
                   f"{ex.artifact:g}" + (f", u = {ex.pre:.3g}" if ex.pre is not None else "")) if ex else ""
        console.print(f"  {escape(b.backend)}: [bold]{escape(t.name)}[/bold]{escape(fed)}: {escape(what + example)}",
                      soft_wrap=True)
    if len(failing) > 6:
        console.print(f"  … and {len(failing) - 6} more (see the report)")
    ties = crafted.get("exact_ties", 0)
    console.print(f"crafted inputs: {crafted.get('samples', 0)} on and beside thresholds, {ties} exact "
                  f"tie{'s' if ties != 1 else ''} in the reference ({crafted.get('certified_ties', 0)} certified, "
                  f"checked with no rounding allowance), {crafted.get('near_ties', 0)} nearest-float near ties")
    for s in report.skipped:
        console.print(f"[dim]not run: {escape(s['backend'])} ({escape(s['reason'])})[/dim]")
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    if report.tie_rule and not report.tie_rule_consistent:
        console.print(f"[red]tie rule: the artifact declares {report.tie_rule.get('artifact')!r}, the model "
                      f"{report.tie_rule.get('reference')!r}[/red]")


def write_report(report: ParityReport, path: Path, extra: dict[str, Any] | None = None) -> None:
    from .report import write_report as _write

    _write(report, path, extra or {})


def _export_extra(result: ExportResult) -> dict[str, Any]:
    conv = result.converted
    return {"export": {"target": result.target, "artifact_bytes": len(conv.data),
                       "binary_stored_bytes": conv.binary_stored_bytes, "binary_floor_bytes": conv.binary_floor_bytes,
                       "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
                       "layers": [{"layer": r.layer, "became": r.became, "note": r.note} for r in conv.rows],
                       "notes": list(conv.notes)}}


def _tolerance(args: argparse.Namespace) -> Tolerance:
    """Defaults, overridden by --atol / --rtol / --flip-margin where the command line has them."""
    tol = Tolerance()
    for name in ("atol", "rtol", "flip_margin"):
        value = getattr(args, name, None)
        if value is not None:
            if not (value >= 0 and np.isfinite(value)):
                raise BadInput(f"--{name.replace('_', '-')} must be a non-negative number, got {value}")
            setattr(tol, name, float(value))
    return tol


def _verdict(report: ParityReport, console: Console) -> int:
    line = report.failure_line()
    if line is None:
        console.print("[green]parity passed[/green]", soft_wrap=True)
        return 0
    from rich.markup import escape

    console.print(f"[red]{escape(line)}[/red]", soft_wrap=True)
    return 1


def _check_report_arg(path: Path | None) -> None:
    if path is not None:
        from .report import check_report_path

        check_report_path(path)
        check_writable(path)


def export_command(args: argparse.Namespace) -> int:
    console = Console(stderr=False)
    _check_report_arg(args.report)
    result = export(args.model, args.target, args.output, tie=args.tie, data=args.data,
                    validate_artifact=not args.no_validate, portable=args.portable, snn_mode=args.snn_mode,
                    trust_pickle=args.trust_pickle, device=getattr(args, "device", None) or "all",
                    tolerance=_tolerance(args), progress=True)
    _print_export(result, console)
    if result.report is None:
        return 0
    print_report(result.report, console)
    if args.report is not None:
        write_report(result.report, args.report, _export_extra(result))
        console.print(f"report written to {args.report}")
    return _verdict(result.report, console)


def validate_command(args: argparse.Namespace) -> int:
    console = Console()
    _check_report_arg(args.report)
    tolerance = _tolerance(args)
    loaded = load(args.model, trust_pickle=args.trust_pickle)
    info = read_artifact(args.artifact)
    dataset = default_data(loaded, args.data)
    # The reference follows the declared rule (--tie, else the model's own), never the artifact's:
    # an artifact built with another rule must fail on inputs that land on a threshold.
    hardening = harden(loaded.module, tie=args.tie)
    report = validate_file(hardening, info, dataset, str(loaded.path), args.device, tolerance, progress=True)
    print_report(report, console)
    if args.report is not None:
        write_report(report, args.report)
        console.print(f"report written to {args.report}")
    return _verdict(report, console)
