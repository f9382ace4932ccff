"""The report's plots: matplotlib's object API (no pyplot, no global state), embedded as base64 PNGs."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from .sizes import (CATEGORIES, CATEGORY_BINARY, CATEGORY_FLOAT, CATEGORY_GRAPH, CATEGORY_OTHER, CATEGORY_THRESHOLD,
                    CATEGORY_UNPACK)
from .parity import MARGIN_EDGES


def png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _backend_bars(ax, backend: dict[str, Any], names: list[str], pos, width: float, floor: float,
                  label: bool) -> None:
    """One backend's stacked bars (explained, then unexplained flips) over the tensors ``names``."""
    tensors = {t["name"]: t for t in backend["tensors"]}
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
        if bad:
            text, color = f"{t['unexplained']:,} bad", "#b3261e"
        elif explained:
            text, color = f"{t['explained']:,} explained", "#8d6e00"
        else:
            text, color = "exact", "#2e7d32"
        ax.text(p_, (floor + explained + bad) * 1.5, text, ha="center", va="bottom", fontsize=7, rotation=90,
                color=color)
    if label:
        ax.text(pos[0], floor * 0.5, backend["backend"], fontsize=6, ha="left", va="top", rotation=90, color="#555")


def agreement_plot(data: dict[str, Any]) -> str:
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
        _backend_bars(ax, b, names, x - 0.4 + width * (k + 0.5), width, floor, label=len(backends) > 1)
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

    ax.legend(handles=[Patch(color="#f9a825", label="explained flips (|u| within rounding)"),
                       Patch(color="#b3261e", label="unexplained flips / float mismatches")],
              fontsize=7, loc="upper right")
    ax.set_title("Per-layer agreement with the reference, in graph order"
                 + (f" (bars left to right: {', '.join(b['backend'] for b in backends)})" if len(backends) > 1 else
                    f" ({backends[0]['backend']})"), fontsize=9)
    return png(fig)


def margin_plot(data: dict[str, Any]) -> str:
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
    tol = data.get("tolerance") or {}
    edges = [e for e in MARGIN_EDGES[1:-1]]
    # derived tolerances differ per element: no single margin to draw
    margin_bin = 0 if tol.get("derived") else \
        int(np.searchsorted(np.asarray(edges), tol.get("flip_margin", 1e-4), side="left")) + 1
    for i, site in enumerate(sites):
        ax = fig.add_subplot(rows, cols, i + 1)
        counts = by_site[site]
        colors = ["#b3261e"] + ["#f9a825" if j <= margin_bin else "#1565c0" for j in range(1, len(counts))]
        ax.bar(np.arange(len(counts)), np.maximum(counts, 0), color=colors)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xticks(np.arange(len(counts)))
        ax.set_xticklabels(labels[: len(counts)], rotation=90, fontsize=6)
        if margin_bin:
            ax.axvline(margin_bin + 0.5, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"{site}  (exact ties: {int(counts[0])})", fontsize=8)
        ax.tick_params(axis="y", labelsize=6)
    fig.suptitle("Distribution of |pre-activation| at each step site (reference; data + crafted inputs)\n"
                 + ("red: exactly on the threshold; blue: elsewhere (each unit's allowance: twice its rounding bound)"
                  if not margin_bin else
                  "red: exactly on the threshold; amber: within the flip margin (dashed line); blue: beyond"),
                 fontsize=9)
    fig.tight_layout()
    return png(fig)


def size_plot(size: dict[str, Any]) -> str:
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
    return png(fig)
