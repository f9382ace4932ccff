"""``htaf-export inspect FILE.onnx|FILE.tflite``: what an exported file says about itself (its metadata), and how
to check it against its model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import metadata as md
from .errors import BadInput
from .runtimes import read_artifact

FIELDS = (("target", md.TARGET), ("written by", md.VERSION), ("source format", md.SOURCE_FORMAT),
          ("source sha256", md.SOURCE_SHA256), ("family", md.FAMILY), ("architecture", md.ARCH),
          ("input shape", md.INPUT_SHAPE), ("tie rule", md.TIE), ("LCE kernel", md.TFLITE_LCE_KERNEL))


def _packed(meta: dict) -> str | None:
    try:
        entries = json.loads(meta[md.BINARY_WEIGHTS])
        weights = sum(int(e["numel"]) for e in entries)
        return f"{len(entries)} tensors, {weights:,} weights at 1 bit each"
    except (KeyError, ValueError, TypeError):
        return None


def _tflite_io(meta: dict, kind: str) -> list[str]:
    """How a TFLite file takes each input (``kind`` "inputs") or gives each output ("outputs"): an image channels
    last, as TFLite runtimes lay images out."""
    try:
        slots = json.loads(meta[md.TFLITE_IO])[kind]
    except (KeyError, ValueError, TypeError):
        return []
    lines = []
    for slot in slots:
        shape = [int(d) for d in slot["shape"]]
        if slot.get("layout") == "nhwc" and len(shape) == 3:
            c, h, w = shape
            lines.append(f"{slot['name']}: [batch, {h}, {w}, {c}], channels last (the model's [{c}, {h}, {w}])")
        elif kind == "inputs":
            lines.append(f"{slot['name']}: [batch, {', '.join(map(str, shape))}]")
    return lines


def render_artifact(path: Path, console: Console) -> None:
    info = read_artifact(path)
    meta = dict(info.metadata)
    if md.TARGET not in meta:
        raise BadInput(f"{path} was not written by htaf-export (no htaf_export metadata); there is nothing to inspect")
    table = Table(title=escape(path.name), title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("size", f"{path.stat().st_size:,} bytes")
    for label, key in FIELDS:
        if meta.get(key) and meta[key] != "unknown":
            value = meta[key] if key != md.SOURCE_SHA256 else meta[key][:16] + "…"
            table.add_row(label, escape(value))
    table.add_row("inputs → outputs", escape(f"{', '.join(info.input_names)} → {', '.join(info.output_names)}"))
    for kind, label in (("inputs", "file input"), ("outputs", "file output")):
        for line in _tflite_io(meta, kind):
            table.add_row(label, escape(line))
    ops = Counter(f"{s.op} ({s.tie})" for s in info.steps)
    table.add_row("steps", escape(f"{len(info.steps)}: " + ", ".join(f"{n}× {op}" for op, n in sorted(ops.items()))))
    packed = _packed(meta)
    if packed:
        table.add_row("packed weights", packed)
    console.print(table)
    console.print("To check it against its model:")
    console.print(f"  htaf-export validate MODEL {escape(str(path))}", soft_wrap=True)
