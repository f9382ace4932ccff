"""Parity reports for machines (JSON, schema in docs/report-schema.md) and people (a self-contained HTML page).

The HTML page needs nothing but a browser: styles are inline and the plots are PNGs embedded as
base64 ``data:`` URIs, drawn with matplotlib's object API (no pyplot, so no global state is touched).
The full JSON report is embedded too, in a ``<script type="application/json" id="report-data">``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInput
from .files import atomic_write_bytes
from .validate import MARGIN_EDGES, ParityReport

REPORT_SUFFIXES = (".json", ".html")

# ---- artifact size breakdown ------------------------------------------------------------------------

CATEGORY_BINARY = "binary weights (1 bit each)"
CATEGORY_UNPACK = "unpacking constants"
CATEGORY_THRESHOLD = "thresholds"
CATEGORY_FLOAT = "float weights"
CATEGORY_OTHER = "other constants"
CATEGORY_GRAPH = "graph, functions and metadata"
CATEGORIES = (CATEGORY_BINARY, CATEGORY_UNPACK, CATEGORY_THRESHOLD, CATEGORY_FLOAT, CATEGORY_OTHER, CATEGORY_GRAPH)
_SUFFIXES = (".weight.packed", ".weight.shape", ".weight.numel", ".weight.unpacked", ".weight", ".bias",
             ".threshold", ".direction", ".running_mean", ".running_var", ".scale", ".packed", ".shape", ".numel")


def _strip(name: str) -> str | None:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _onnx_breakdown(path: Path) -> list[dict[str, Any]]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def layer_of(name: str) -> str:
        stripped = _strip(name)
        if stripped:
            return stripped
        if name.startswith("htaf.unpack."):
            return "(shared unpacking constants)"
        for node in consumers.get(name, []):  # an unnamed bias: the layer whose weight sits beside it
            for other in node.input:
                if other != name and _strip(other):
                    return _strip(other) or other
        return "(unnamed constants)"

    rows: dict[tuple[str, str], int] = {}
    for init in proto.graph.initializer:
        nbytes = len(init.raw_data) if init.HasField("raw_data") else numpy_helper.to_array(init).nbytes
        name = init.name
        if name.endswith(".packed") and init.data_type == onnx.TensorProto.UINT8:
            category = CATEGORY_BINARY
        elif name.startswith("htaf.unpack.") or name.endswith((".shape", ".numel")):
            category = CATEGORY_UNPACK
        elif name.endswith((".threshold", ".direction")):
            category = CATEGORY_THRESHOLD
        elif init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            category = CATEGORY_FLOAT
        else:
            category = CATEGORY_OTHER
        key = (layer_of(name), category)
        rows[key] = rows.get(key, 0) + nbytes
    return [{"layer": layer, "category": category, "bytes": b} for (layer, category), b in rows.items()]


def _tflite_breakdown(path: Path) -> list[dict[str, Any]]:
    from .runtimes.tflite import constant_bytes, op_names, read_model

    model = read_model(path.read_bytes())
    graph = model.subgraphs[0]
    ops = op_names(model)
    binary_filters = {int(op.inputs[1]) for op, name in zip(graph.operators, ops)
                      if name == "LceBconv2d" and len(op.inputs) > 1}
    consumer: dict[int, str] = {}
    for k, (op, name) in enumerate(zip(graph.operators, ops)):
        for i in op.inputs:
            consumer.setdefault(int(i), f"op {k} {name}")
    rows: dict[tuple[str, str], int] = {}
    for index, tensor in enumerate(graph.tensors):
        nbytes = constant_bytes(model, index)
        if not nbytes:
            continue
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
        # Layers named after their weights where the converter kept the names; else the op that reads them.
        layer = _strip(name.split(";")[0]) or consumer.get(index) or name
        if index in binary_filters:
            category = CATEGORY_BINARY
        elif "threshold" in name:
            category = CATEGORY_THRESHOLD
        elif tensor.type in (0, 1):  # FLOAT32, FLOAT16
            category = CATEGORY_FLOAT
        else:
            category = CATEGORY_OTHER
        rows[(layer, category)] = rows.get((layer, category), 0) + nbytes
    return [{"layer": layer, "category": category, "bytes": b} for (layer, category), b in rows.items()]


def size_breakdown(path: str | Path) -> dict[str, Any]:
    """Bytes of the artifact by layer and category, read from the file itself.

    ONNX: initializers (packed 1-bit weights, unpacking constants, thresholds, float weights); TFLite:
    constant buffers (LCE bit-packed filters, float weights). The rest of the file (graph, functions,
    metadata) is one more row. A file that cannot be read this way is one row.
    """
    path = Path(path)
    total = path.stat().st_size if path.is_file() else 0
    rows: list[dict[str, Any]] = []
    note = None
    try:
        if path.suffix == ".onnx":
            rows = _onnx_breakdown(path)
        elif path.suffix == ".tflite":
            rows = _tflite_breakdown(path)
    except Exception as e:  # noqa: BLE001 - a breakdown is a nicety; the report must still be written
        note = f"size breakdown unavailable: {type(e).__name__}"
        rows = []
    counted = sum(r["bytes"] for r in rows)
    rows.append({"layer": "(graph, functions, metadata)", "category": CATEGORY_GRAPH, "bytes": max(total - counted, 0)})
    by_category = {c: sum(r["bytes"] for r in rows if r["category"] == c) for c in CATEGORIES}
    out: dict[str, Any] = {"total_bytes": total, "by_category": {k: v for k, v in by_category.items() if v},
                           "rows": sorted(rows, key=lambda r: (-r["bytes"], r["layer"]))}
    if note:
        out["note"] = note
    return out


# ---- JSON -------------------------------------------------------------------------------------------


def report_dict(report: ParityReport, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    d = report.to_dict()
    d["size"] = size_breakdown(report.artifact)
    d.update(extra or {})
    return d


def report_json(report: ParityReport, extra: dict[str, Any] | None = None) -> str:
    return json.dumps(report_dict(report, extra), indent=2, sort_keys=False, default=_json_default,
                      allow_nan=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
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


def write_report(report: ParityReport, path: Path, extra: dict[str, Any] | None = None) -> None:
    path = Path(path)
    check_report_path(path)
    data = _finite(report_dict(report, extra))
    if path.suffix == ".json":
        text = json.dumps(data, indent=2, default=_json_default, allow_nan=False)
        atomic_write_bytes(path, text.encode())
    else:
        atomic_write_bytes(path, render_html(data).encode())


# ---- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.3em .6em;
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
    return f"<table>{head_row}{''.join(body)}</table>"


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _agreement_plot(data: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    backends = data["backends"]
    if not backends or not backends[0]["tensors"]:
        return "<p class='muted'>No tensors were compared.</p>"
    names = [t["name"] for t in backends[0]["tensors"]]
    fig = Figure(figsize=(max(6.5, 0.5 * len(names) * len(backends) + 2.5), 4.4))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(backends)
    x = np.arange(len(names))
    floor = 1e-7
    for k, b in enumerate(backends):
        tensors = {t["name"]: t for t in b["tensors"]}
        pos = x - 0.4 + width * (k + 0.5)
        for p_, n in zip(pos, names):
            t = tensors.get(n)
            if t is None or not t["elements"]:
                continue
            bad = 100.0 * t["unexplained"] / t["elements"]
            explained = 100.0 * t["explained"] / t["elements"]
            if explained:
                ax.bar(p_, explained, width, bottom=floor, color="#f9a825", edgecolor="black", linewidth=0.3)
            if bad:
                ax.bar(p_, bad, width, bottom=floor + explained, color="#b3261e", edgecolor="black", linewidth=0.3)
            top = floor + explained + bad
            if bad:
                label, color = f"{t['unexplained']:,} bad", "#b3261e"
            elif explained:
                label, color = f"{t['explained']:,} explained", "#8d6e00"
            else:
                label, color = "exact", "#2e7d32"
            ax.text(p_, top * 1.5, label, ha="center", va="bottom", fontsize=7, rotation=90, color=color)
        if len(backends) > 1:
            ax.text(pos[0], floor * 0.5, b["backend"], fontsize=6, ha="left", va="top", rotation=90, color="#555")
    ax.set_yscale("log")
    ax.set_ylim(floor * 0.02 if len(backends) > 1 else floor, 1e5)
    ax.set_yticks([10.0**e for e in range(-7, 3)])
    ax.set_ylabel("disagreeing elements (%, log)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    first = (data.get("first_failure") or {}).get("tensor")
    for tick, name in zip(ax.get_xticklabels(), names):
        if name == first:
            tick.set_color("#b3261e")
            tick.set_fontweight("bold")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#f9a825", label="explained flips (|u| within the flip margin)"),
                       Patch(color="#b3261e", label="unexplained flips / float mismatches")],
              fontsize=7, loc="upper right")
    ax.set_title("Per-layer agreement with the reference, in graph order"
                 + (f" (bars left to right: {', '.join(b['backend'] for b in backends)})" if len(backends) > 1 else
                    f" ({backends[0]['backend']})"), fontsize=9)
    return _png(fig)


def _margin_plot(data: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    margins = data.get("margins") or {}
    if not margins:
        return "<p class='muted'>No step tensors: no pre-activation margins to show.</p>"
    by_site: dict[str, np.ndarray] = {}
    for name, h in margins.items():
        site = name.split("@")[0]
        by_site[site] = by_site.get(site, 0) + np.asarray(h["counts"], dtype=np.int64)
    sites = list(by_site)[:12]
    cols = min(3, len(sites))
    rows = (len(sites) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows))
    labels = ["0"] + [f"≤1e{e}" for e in range(-9, 4)] + [">1e3"]
    flip_margin = (data.get("tolerance") or {}).get("flip_margin", 1e-4)
    edges = [e for e in MARGIN_EDGES[1:-1]]
    margin_bin = int(np.searchsorted(np.asarray(edges), flip_margin, side="left")) + 1
    for i, site in enumerate(sites):
        ax = fig.add_subplot(rows, cols, i + 1)
        counts = by_site[site]
        colors = ["#b3261e"] + ["#f9a825" if j <= margin_bin else "#1565c0" for j in range(1, len(counts))]
        ax.bar(np.arange(len(counts)), np.maximum(counts, 0), color=colors)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xticks(np.arange(len(counts)))
        ax.set_xticklabels(labels[: len(counts)], rotation=90, fontsize=6)
        ax.axvline(margin_bin + 0.5, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"{site}  (exact ties: {int(counts[0])})", fontsize=8)
        ax.tick_params(axis="y", labelsize=6)
    fig.suptitle("Distribution of |pre-activation| at each step site (reference; data + crafted inputs)\n"
                 "red: exactly on the threshold; amber: within the flip margin (dashed line); blue: beyond",
                 fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _size_plot(size: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    rows = size.get("rows") or []
    layers: dict[str, dict[str, int]] = {}
    for r in rows:
        layers.setdefault(r["layer"], {})[r["category"]] = layers.setdefault(r["layer"], {}).get(r["category"], 0) + r["bytes"]
    order = sorted(layers, key=lambda l: -sum(layers[l].values()))[:20]
    if not order:
        return ""
    fig = Figure(figsize=(8, 0.35 * len(order) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    colors = {CATEGORY_BINARY: "#2e7d32", CATEGORY_UNPACK: "#a5d6a7", CATEGORY_THRESHOLD: "#f9a825",
              CATEGORY_FLOAT: "#1565c0", CATEGORY_OTHER: "#90a4ae", CATEGORY_GRAPH: "#cfd8dc"}
    left = np.zeros(len(order))
    y = np.arange(len(order))[::-1]
    for c in CATEGORIES:
        vals = np.array([layers[l].get(c, 0) for l in order], dtype=float)
        if vals.any():
            ax.barh(y, vals, left=left, color=colors[c], label=c, edgecolor="white", linewidth=0.3)
            left += vals
    ax.set_yticks(y)
    ax.set_yticklabels(order, fontsize=8)
    ax.set_xlabel("bytes")
    ax.set_title(f"Artifact size by layer: {size.get('total_bytes', 0):,} B in all", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


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


def render_html(data: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (``data`` is the JSON report as a dict)."""
    passed = data["passed"]
    failure = data.get("first_failure")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>htaf-export parity report: "
             f"{_e(Path(str(data['artifact'])).name)}</title><style>{_CSS}</style></head><body>",
             "<h1>htaf-export parity report</h1>"]
    if passed:
        parts.append("<div class='banner pass'>PASS: the artifact makes the same binary decisions as the hardened "
                     "model on every backend, and every flip is explained by rounding.</div>")
    else:
        where = ""
        if failure and failure.get("tensor"):
            layer = f" (fed by layer <code>{_e(failure.get('layer'))}</code>)" if failure.get("layer") else ""
            where = (f" First failing tensor: <code>{_e(failure['tensor'])}</code>{layer} on "
                     f"<code>{_e(failure['backend'])}</code>.")
        parts.append(f"<div class='banner fail'>FAIL.{where} {_e(failure.get('reason') if failure else '')}</div>")
    crafted = data.get("crafted") or {}
    tol = data.get("tolerance") or {}
    tie = data.get("tie_rule") or {}
    parts.append(_table(["", ""], [
        ["model", f"<code>{_e(data['model'])}</code>"],
        ["artifact", f"<code>{_e(data['artifact'])}</code>"],
        ["data", _e(data.get("inputs"))],
        ["crafted inputs", f"{_fmt(crafted.get('samples', 0))} inputs on and beside thresholds: "
                           f"{_fmt(crafted.get('exact_ties', 0))} exact ties "
                           f"({_fmt(crafted.get('certified_ties', 0))} certified), "
                           f"{_fmt(crafted.get('near_ties', 0))} nearest-float near ties"],
        ["tolerance", f"atol {_fmt(tol.get('atol'))}, rtol {_fmt(tol.get('rtol'))}, "
                      f"flip margin |u| ≤ {_fmt(tol.get('flip_margin'))}"],
        ["tie rule", f"model {_e(tie.get('reference'))}, artifact {_e(tie.get('artifact'))}"],
        ["time", f"{_fmt(data.get('seconds'))} s"],
    ]))

    parts.append("<h2>Backends</h2>")
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
    parts.append(_table(["backend", "data", "crafted", "unexplained flips", "explained flips", "tie violations",
                         "max float error", "argmax agreement", "accuracy ref → artifact", "seconds", "result"],
                        rows, numeric={1, 2, 3, 4, 5, 6, 7, 9}, bad_rows=bad))
    if data.get("skipped"):
        parts.append("<p class='muted'>Not run here: " + "; ".join(
            f"<code>{_e(s['backend'])}</code> ({_e(s['reason'])})" for s in data["skipped"]) + "</p>")

    parts.append("<h2>Per-layer agreement</h2>")
    parts.append("<p class='muted'>Binary tensors are compared bit for bit. A flip is <em>explained</em> when the "
                 "reference pre-activation u lies within the flip margin of its threshold (float rounding may put "
                 "another implementation on the other side); a flip on a <em>certified tie</em> (a crafted input "
                 "where every float32 evaluation order gives u = 0 exactly) is never explained; any other flip "
                 "fails. Float tensors must agree within atol + rtol·|reference|.</p>")
    parts.append(_agreement_plot(data))
    for b in data["backends"]:
        parts.append(f"<h3>{_e(b['backend'])} ({_e(b['device'])})</h3>")
        rows, bad = [], set()
        for i, t in enumerate(b["tensors"]):
            if not t["passed"]:
                bad.add(i)
            rows.append([f"<code>{_e(t['name'])}</code>", _e(t["kind"]), _e(t.get("layer") or ""),
                         _fmt(t["elements"]), _fmt(t["mismatched"]), _fmt(t["explained"]), _fmt(t["unexplained"]),
                         _fmt(t["exact_ties"]), _fmt(t["certified_ties"]), _fmt(t["tie_violations"]),
                         _fmt(t["min_margin"]), _fmt(t["max_abs_error"]),
                         "<span class='pass'>pass</span>" if t["passed"] else "<span class='fail'>FAIL</span>"])
        parts.append(_table(["tensor", "kind", "fed by", "elements", "mismatched", "explained", "unexplained",
                             "exact ties", "certified ties", "tie violations", "min |u|", "max abs error", ""],
                            rows, numeric=set(range(3, 12)), bad_rows=bad))
        examples = [(t["name"], ex) for t in b["tensors"] for ex in t.get("examples", [])]
        if examples:
            parts.append("<p>Examples of unexplained mismatches:</p>")
            parts.append(_table(["tensor", "inputs", "sample", "unit", "reference", "artifact", "pre-activation u",
                                 "certified tie"],
                                [[f"<code>{_e(n)}</code>", _e(ex["inputs"]), _fmt(ex["sample"]), _fmt(ex["unit"]),
                                  _fmt(ex["reference"]), _fmt(ex["artifact"]), _fmt(ex.get("pre"), 4),
                                  "yes" if ex.get("certified_tie") else ""] for n, ex in examples[:12]],
                                numeric={2, 3, 4, 5, 6}))

    parts.append("<h2>Distribution of pre-activation margins</h2>")
    parts.append("<p class='muted'>How close the reference's pre-activations u come to their thresholds. Flips "
                 "are explained only inside the flip margin, and never on certified ties.</p>")
    parts.append(_margin_plot(data))

    parts.append("<h2>Crafted threshold inputs</h2>")
    by_site = crafted.get("by_site") or {}
    if by_site:
        parts.append(_table(["site call", "exact ties", "certified", "below", "above", "near", "closest near |u|"],
                            [[f"<code>{_e(k)}</code>", _fmt(v["tie"]), _fmt(v["certified"]), _fmt(v["below"]),
                              _fmt(v["above"]), _fmt(v["near"]), _fmt(v["closest_near"])] for k, v in by_site.items()],
                            numeric={1, 2, 3, 4, 5, 6}))
    for note in crafted.get("notes") or []:
        parts.append(f"<p class='muted'>{_e(note)}</p>")

    size = data.get("size") or {}
    parts.append("<h2>Size breakdown</h2>")
    parts.append(_size_plot(size))
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
    payload = json.dumps(data, default=_json_default, allow_nan=False).replace("</", "<\\/")
    parts.append(f"<script type='application/json' id='report-data'>{payload}</script>")
    parts.append("<p class='muted'>Written by htaf-export. The JSON report above follows docs/report-schema.md.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
