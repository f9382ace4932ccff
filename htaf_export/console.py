"""What a person sees in the terminal: the export summary, the parity table, progress, the verdict.

Reads the same objects the JSON and HTML reports read (``ExportResult``, ``ParityReport``).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .pipeline import ExportResult, Progress
from .parity import RATIO_FLOOR_S, ParityReport


def print_export(result: ExportResult, console: Console) -> None:
    conv = result.conversion
    table = Table(title=escape(f"{result.artifact} ({result.target})"), title_justify="left")
    for col in ("layer / tensor", "became", "note"):
        table.add_column(col)
    for row in conv.rows:
        table.add_row(escape(row.layer), escape(row.became), escape(row.note))
    console.print(table)
    line = f"artifact size {len(conv.data):,} B"
    if conv.binary_floor_bytes:
        line += (f"; binary weights {conv.binary_stored_bytes:,} B stored vs 1-bit floor "
                 f"{conv.binary_floor_bytes:,.0f} B = {conv.binary_stored_bytes / conv.binary_floor_bytes:.3f}x")
    console.print(line)
    for note in conv.notes:
        console.print(f"note: {escape(note)}")
    if result.recommendation is not None:
        console.print(escape(result.recommendation.line()))
    console.print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))


def _count(n: int) -> str:
    return f"{n:,}"


def _backend_table(report: ParityReport) -> Table:
    crafted = report.crafted or {}
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
                      f"{b.data.agree + b.data.explained}/{b.data.samples}", acc,
                      "[green]pass[/green]" if b.passed else "[red]FAIL[/red]")
    return table


def _print_failures(report: ParityReport, console: Console) -> None:
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


def print_report(report: ParityReport, console: Console) -> None:
    """The parity summary: one row per backend, then the failing tensors, the crafted inputs and the verdict."""
    console.print(_backend_table(report))
    _print_failures(report, console)
    crafted = report.crafted or {}
    ties = crafted.get("exact_ties", 0)
    console.print(f"crafted inputs: {crafted.get('samples', 0)} on and beside thresholds, {ties} exact "
                  f"tie{'s' if ties != 1 else ''} in the reference ({crafted.get('certified_ties', 0)} certified, "
                  f"checked with no rounding allowance), {crafted.get('near_ties', 0)} nearest-float near ties")
    inside = sum(b.inference_seconds for b in report.backends)
    if inside >= RATIO_FLOOR_S:
        console.print(f"validation: {report.seconds:.1f}s, {report.seconds / inside:.2f}x the runtimes' own "
                      f"inference ({inside:.1f}s)")
    elif inside > 0:  # a ratio to a few milliseconds says nothing
        console.print(f"validation: {report.seconds:.1f}s (the runtimes' own inference: {inside * 1e3:.0f} ms)")
    for s in report.skipped:
        console.print(f"[dim]not run: {escape(s['backend'])} ({escape(s['reason'])})[/dim]")
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    if report.tie_rule and not report.tie_rule_consistent:
        console.print(f"[red]tie rule: the artifact declares {report.tie_rule.get('artifact')!r}, the model "
                      f"{report.tie_rule.get('reference')!r}[/red]")


def verdict(report: ParityReport, console: Console) -> int:
    """Print the one-line verdict; the exit code (0 passed, 1 parity failure)."""
    line = report.failure_line()
    if line is None:
        console.print("[green]parity passed[/green]", soft_wrap=True)
        return 0
    console.print(f"[red]{escape(line)}[/red]", soft_wrap=True)
    return 1


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | None]:
    """A rich progress bar on stderr while validation runs (only on a terminal); yields the callback."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    with Bar(TextColumn("validating"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
             TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("validate", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
