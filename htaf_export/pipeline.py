"""The one-command pipeline: load → harden → capture → convert → write → validate → report."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from . import __version__
from .capture import Capture, capture
from .data import Dataset, digits, load_npz
from .errors import BadInput
from .files import atomic_write_bytes, check_writable
from .harden import HardenResult, harden
from .io import LoadedModel, load
from .runtimes import ArtifactInfo, read_artifact, runners_for
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


def default_data(loaded: LoadedModel, data_path: Path | None) -> Dataset:
    """The user's data; else the bundled digits for models with digits-shaped input; else seeded noise."""
    if data_path is not None:
        return load_npz(data_path, loaded.input_shape)
    if int(np.prod(loaded.input_shape)) == 64:
        return digits("all", loaded.input_shape)
    rng = np.random.default_rng(0)
    return Dataset(rng.standard_normal((GENERATED_SAMPLES, *loaded.input_shape)).astype(np.float32), None,
                   f"generated: {GENERATED_SAMPLES} standard normal samples (seed 0)")


def export(model: str | Path | LoadedModel, target: str, output: str | Path | None = None, *, tie: str | None = None,
           data: Path | None = None, validate_artifact: bool = True, portable: bool = False,
           snn_mode: str = "unrolled", trust_pickle: bool = False, device: str = "all") -> ExportResult:
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
        result.report = validate_file(hardening, read_artifact(out), dataset, str(loaded.path), device)
        seconds["validate"] = time.perf_counter() - t
    return result


def validate_file(hardening: HardenResult, info: ArtifactInfo, data: Dataset, model_name: str,
                  device: str = "all", tolerance: Tolerance | None = None) -> ParityReport:
    runners = runners_for(info, device)
    if not runners:
        raise BadInput(f"no runtime on this machine can run {info.path} on device {device!r}")
    return validate(hardening.model, info, runners, data, model_name, tolerance)


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


def print_report(report: ParityReport, console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"Parity on {report.inputs}", title_justify="left")
    for col in ("backend", "tensors", "binary flips (unexplained/explained)", "max float error", "argmax agreement",
                "accuracy ref → artifact", "result"):
        table.add_column(col)
    for b in report.backends:
        flips = sum(t.unexplained for t in b.tensors if t.kind == "binary")
        explained = sum(t.explained for t in b.tensors if t.kind == "binary")
        err = max((t.max_abs_error for t in b.tensors if t.kind == "float"), default=0.0)
        acc = (f"{b.reference_correct / b.labelled:.2%} → {b.artifact_correct / b.labelled:.2%}" if b.labelled else "-")
        table.add_row(b.backend, str(len(b.tensors)), f"{flips}/{explained}", f"{err:.2e}",
                      f"{b.argmax_agree}/{b.samples}", acc,
                      "[green]pass[/green]" if b.passed else f"[red]FAIL at {b.first_failure or 'argmax'}[/red]")
    console.print(table)


def write_report(report: ParityReport, path: Path, extra: dict[str, Any] | None = None) -> None:
    from .report import write_report as _write

    _write(report, path, extra or {})


def export_command(args: argparse.Namespace) -> int:
    console = Console(stderr=False)
    result = export(args.model, args.target, args.output, tie=args.tie, data=args.data,
                    validate_artifact=not args.no_validate, portable=args.portable, snn_mode=args.snn_mode,
                    trust_pickle=args.trust_pickle)
    _print_export(result, console)
    if result.report is None:
        return 0
    print_report(result.report, console)
    if args.report is not None:
        write_report(result.report, args.report)
    if not result.report.passed:
        backend, tensor = result.report.first_failure or ("?", "?")
        console.print(f"[red]parity FAILED on {backend}: first failing tensor {tensor}[/red]")
        return 1
    return 0


def validate_command(args: argparse.Namespace) -> int:
    console = Console()
    loaded = load(args.model, trust_pickle=args.trust_pickle)
    info = read_artifact(args.artifact)
    dataset = default_data(loaded, args.data)
    # The reference follows the declared rule (--tie, else the model's own), never the artifact's:
    # an artifact built with another rule must fail on inputs that land on a threshold.
    hardening = harden(loaded.module, tie=args.tie)
    report = validate_file(hardening, info, dataset, str(loaded.path), args.device)
    print_report(report, console)
    if args.report is not None:
        write_report(report, args.report)
    if not report.passed:
        backend, tensor = report.first_failure or ("?", "?")
        console.print(f"[red]parity FAILED on {backend}: first failing tensor {tensor}[/red]")
        return 1
    return 0
