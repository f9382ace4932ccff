"""Parity reports for machines (JSON, schema in docs/report-schema.md) and people (a self-contained HTML page).

Both read the same document: the ``ParityReport`` and, after an export, the ``ExportResult`` beside it.
The HTML page needs nothing but a browser: styles are inline and the plots are PNGs embedded as
base64 ``data:`` URIs. The full JSON report is embedded too, in a
``<script type="application/json" id="report-data">``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInput
from .files import atomic_write_bytes
from .pipeline import ExportResult
from .report_plots import agreement_plot, margin_plot, size_plot
from .sizes import size_breakdown
from .targets import REPORT_SUFFIXES
from .parity import RATIO_FLOOR_S, ParityReport


def report_dict(report: ParityReport, export: ExportResult | None = None) -> dict[str, Any]:
    """The JSON document: the parity report, the artifact's size breakdown, and the export summary."""
    d = report.to_dict()
    d["size"] = size_breakdown(report.artifact)
    if export is not None:
        d["export"] = export.to_dict()
    return _finite(d)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


def _finite(obj: Any) -> Any:
    """JSON has no infinity: the last histogram edge is written as null."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def check_report_path(path: Path) -> None:
    """Refuse, before any work, a report path with the wrong suffix."""
    if path.suffix not in REPORT_SUFFIXES:
        raise BadInput(f"--report must end in .json or .html, got {path}")


def write_report(report: ParityReport, path: Path, export: ExportResult | None = None) -> None:
    path = Path(path)
    check_report_path(path)
    data = report_dict(report, export)
    if path.suffix == ".json":
        atomic_write_bytes(path, json.dumps(data, indent=2, default=_json_default, allow_nan=False).encode())
    else:
        atomic_write_bytes(path, render_html(data).encode())


# ---- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
.wide{overflow-x:auto}table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ddd;
padding:.25em .45em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#19692c;font-weight:600}.fail{color:#b3261e;font-weight:600}
.banner{padding:.8em 1em;border-radius:6px;margin:1em 0;font-size:1.05em}
.banner.pass{background:#e6f4ea;border:1px solid #19692c}.banner.fail{background:#fce8e6;border:1px solid #b3261e}
tr.bad td{background:#fdf0ef}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
code{background:#f4f4f4;padding:0 .25em}.muted{color:#666;font-size:.9em}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None,
           bad_rows: set[int] | None = None) -> str:
    numeric = numeric or set()
    bad_rows = bad_rows or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    head_row = f"<tr>{head}</tr>" if any(headers) else ""
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td class='num'>{c}</td>" if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row))
        body.append(f"<tr class='bad'>{cells}</tr>" if i in bad_rows else f"<tr>{cells}</tr>")
    return f"<div class='wide'><table>{head_row}{''.join(body)}</table></div>"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return _e(v)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _banner(data: dict[str, Any]) -> str:
    if data["passed"]:
        return ("<div class='banner pass'>PASS: the artifact makes the same binary decisions as the hardened "
                "model on every backend, and every flip is explained by rounding.</div>")
    failure = data.get("first_failure")
    where = ""
    if failure and failure.get("tensor"):
        layer = f" (fed by layer <code>{_e(failure.get('layer'))}</code>)" if failure.get("layer") else ""
        where = (f" First failing tensor: <code>{_e(failure['tensor'])}</code>{layer} on "
                 f"<code>{_e(failure['backend'])}</code>.")
    return f"<div class='banner fail'>FAIL.{where} {_e(failure.get('reason') if failure else '')}</div>"


def _tolerance_text(tol: dict[str, Any]) -> str:
    fixed = (f"atol {_fmt(tol.get('atol'))}, rtol {_fmt(tol.get('rtol'))}, "
             f"flip margin |u| ≤ {_fmt(tol.get('flip_margin'))}")
    if tol.get("derived"):
        return f"derived: twice each element's float32 rounding bound (where no bound exists: {fixed})"
    return f"fixed: {fixed}"


def _overview(data: dict[str, Any]) -> str:
    crafted = data.get("crafted") or {}
    tol = data.get("tolerance") or {}
    tie = data.get("tie_rule") or {}
    return _table(["", ""], [
        ["model", f"<code>{_e(data['model'])}</code>"],
        ["artifact", f"<code>{_e(data['artifact'])}</code>"],
        ["data", _e(data.get("inputs"))],
        ["crafted inputs", f"{_fmt(crafted.get('samples', 0))} inputs on and beside thresholds: "
                           f"{_fmt(crafted.get('exact_ties', 0))} exact ties "
                           f"({_fmt(crafted.get('certified_ties', 0))} certified), "
                           f"{_fmt(crafted.get('near_ties', 0))} nearest-float near ties"],
        ["tolerance", _tolerance_text(tol)],
        ["tie rule", f"model {_e(tie.get('reference'))}, artifact {_e(tie.get('artifact'))}"],
        ["time", _time_text(data)],
    ])


def _time_text(data: dict[str, Any]) -> str:
    inside = sum(b.get("inference_seconds") or 0.0 for b in data.get("backends", []))
    text = f"{_fmt(data.get('seconds'))} s"
    if inside >= RATIO_FLOOR_S and data.get("seconds"):
        text += f": {data['seconds'] / inside:.2f}× the runtimes' own inference ({_fmt(inside)} s)"
    elif inside > 0:
        text += f" (the runtimes' own inference: {inside * 1e3:.0f} ms)"
    return text


def _backends(data: dict[str, Any]) -> list[str]:
    rows, bad = [], set()
    for i, b in enumerate(data["backends"]):
        flips = sum(t["unexplained"] for t in b["tensors"] if t["kind"] == "binary")
        explained = sum(t["explained"] for t in b["tensors"] if t["kind"] == "binary")
        violations = sum(t["tie_violations"] for t in b["tensors"])
        err = max((t["max_abs_error"] for t in b["tensors"] if t["kind"] == "float"), default=0.0)
        if not b["passed"]:
            bad.add(i)
        result = "<span class='pass'>pass</span>" if b["passed"] else \
            f"<span class='fail'>FAIL at {_e(b['first_failure'])}</span>"
        rows.append([_e(b["backend"]), _fmt(b["samples"]), _fmt(b["crafted_samples"]), _fmt(flips), _fmt(explained),
                     _fmt(violations), _fmt(err), _pct(b["argmax_agreement"]),
                     f"{_pct(b['reference_accuracy'])} → {_pct(b['artifact_accuracy'])}", _fmt(b["seconds"]), result])
    parts = ["<h2>Backends</h2>",
             _table(["backend", "data", "crafted", "unexplained flips", "explained flips", "tie violations",
                     "max float error", "argmax agreement", "accuracy ref → artifact", "seconds", "result"],
                    rows, numeric={1, 2, 3, 4, 5, 6, 7, 9}, bad_rows=bad)]
    if data.get("skipped"):
        parts.append("<p class='muted'>Not run here: " + "; ".join(
            f"<code>{_e(s['backend'])}</code> ({_e(s['reason'])})" for s in data["skipped"]) + "</p>")
    return parts


def _backend_tensors(b: dict[str, Any]) -> list[str]:
    rows, bad = [], set()
    for i, t in enumerate(b["tensors"]):
        if not t["passed"]:
            bad.add(i)
        rows.append([f"<code>{_e(t['name'])}</code>", _e(t["kind"]), _e(t.get("layer") or ""),
                     _fmt(t["elements"]), _fmt(t["mismatched"]), _fmt(t["explained"]), _fmt(t["unexplained"]),
                     _fmt(t["exact_ties"]), _fmt(t["certified_ties"]), _fmt(t["tie_violations"]),
                     _fmt(t["min_margin"]), _fmt(t["max_abs_error"]),
                     "<span class='pass'>pass</span>" if t["passed"] else "<span class='fail'>FAIL</span>"])
    parts = [f"<h3>{_e(b['backend'])} ({_e(b['device'])})</h3>",
             _table(["tensor", "kind", "fed by", "elements", "mismatched", "explained", "unexplained",
                     "exact ties", "certified ties", "tie violations", "min |u|", "max abs error", ""],
                    rows, numeric=set(range(3, 12)), bad_rows=bad)]
    examples = [(t["name"], ex) for t in b["tensors"] for ex in t.get("examples", [])]
    if examples:
        parts.append("<p>Examples of unexplained mismatches:</p>")
        parts.append(_table(["tensor", "inputs", "sample", "unit", "reference", "artifact", "pre-activation u",
                             "certified tie"],
                            [[f"<code>{_e(n)}</code>", _e(ex["inputs"]), _fmt(ex["sample"]), _fmt(ex["unit"]),
                              _fmt(ex["reference"]), _fmt(ex["artifact"]), _fmt(ex.get("pre"), 4),
                              "yes" if ex.get("certified_tie") else ""] for n, ex in examples[:12]],
                            numeric={2, 3, 4, 5, 6}))
    return parts


def _layers(data: dict[str, Any]) -> list[str]:
    parts = ["<h2>Per-layer agreement</h2>",
             "<p class='muted'>Binary tensors are compared bit for bit. A flip is <em>explained</em> when the "
             "reference pre-activation u lies within its tolerance of the threshold (float rounding may put "
             "another implementation on the other side): twice u's float32 rounding bound when tolerances are "
             "derived, else the fixed flip margin. A flip on a <em>certified tie</em> (a crafted input "
             "where every float32 evaluation order gives u = 0 exactly) is never explained; any other flip "
             "fails. Float tensors must agree within twice their rounding bound (derived) or "
             "atol + rtol·|reference| (fixed).</p>",
             agreement_plot(data)]
    for b in data["backends"]:
        parts += _backend_tensors(b)
    return parts


def _margins_and_crafted(data: dict[str, Any]) -> list[str]:
    parts = ["<h2>Distribution of pre-activation margins</h2>",
             "<p class='muted'>How close the reference's pre-activations u come to their thresholds. Flips "
             "are explained only inside their tolerance, and never on certified ties.</p>",
             margin_plot(data), "<h2>Crafted threshold inputs</h2>"]
    crafted = data.get("crafted") or {}
    by_site = crafted.get("by_site") or {}
    if by_site:
        parts.append(_table(["site call", "exact ties", "certified", "below", "above", "near", "closest near |u|"],
                            [[f"<code>{_e(k)}</code>", _fmt(v["tie"]), _fmt(v["certified"]), _fmt(v["below"]),
                              _fmt(v["above"]), _fmt(v["near"]), _fmt(v["closest_near"])] for k, v in by_site.items()],
                            numeric={1, 2, 3, 4, 5, 6}))
    parts += [f"<p class='muted'>{_e(note)}</p>" for note in crafted.get("notes") or []]
    return parts


def _size_and_export(data: dict[str, Any]) -> list[str]:
    size = data.get("size") or {}
    parts = ["<h2>Size breakdown</h2>", size_plot(size)]
    if size.get("by_category"):
        parts.append(_table(["category", "bytes"], [[_e(k), _fmt(v)] for k, v in size["by_category"].items()],
                            numeric={1}))
    export = data.get("export")
    if export:
        parts.append("<h2>Export</h2>")
        parts.append(_table(["layer / tensor", "became", "note"],
                            [[f"<code>{_e(r['layer'])}</code>", _e(r["became"]), _e(r["note"])]
                             for r in export.get("layers", [])]))
    if data.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in data["notes"]) + "</ul>")
    return parts


def render_html(data: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (``data`` is the JSON report as a dict)."""
    payload = json.dumps(data, default=_json_default, allow_nan=False).replace("</", "<\\/")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>htaf-export parity report: "
             f"{_e(Path(str(data['artifact'])).name)}</title><style>{_CSS}</style></head><body>",
             "<h1>htaf-export parity report</h1>", _banner(data), _overview(data),
             *_backends(data), *_layers(data), *_margins_and_crafted(data), *_size_and_export(data),
             f"<script type='application/json' id='report-data'>{payload}</script>",
             "<p class='muted'>Written by htaf-export. The JSON report above follows docs/report-schema.md.</p>",
             "</body></html>"]
    return "\n".join(parts)
