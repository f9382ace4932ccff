"""Where in the user's source a graph node came from, so that a refusal naming an exporter's node
(``node_slice_1``) also names the module and the line the user wrote (``module enc.1, net.py:14: y = ...``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Mapping

import onnx_ir as ir

from .errors import UnsupportedLayer

STACK_TRACE = "pkg.torch.onnx.stack_trace"  # what torch.onnx's exporter records for each node
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the module path, then the op: ['', 'enc', '1', 'max_pool2d']
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in [^\n]*\n\s*(?P<code>[^\n]*)')
_PACKAGE = str(Path(__file__).resolve().parent)
LONGEST = 70


def _user_line(trace: str) -> str | None:
    """The innermost frame outside installed packages and this package, as ``file.py:line: code``."""
    for frame in reversed(list(_FRAME.finditer(trace))):
        path = frame["file"]
        if "site-packages" in path or "dist-packages" in path or path.startswith(_PACKAGE) or path.startswith("<"):
            continue
        code = " ".join(frame["code"].split())
        code = code if len(code) <= LONGEST else code[:LONGEST - 1] + "…"
        return f"{Path(path).name}:{frame['line']}: {code}"
    return None


def _module(scopes: str | None) -> str | None:
    """The module path in a node's name scopes (each scope a full path, the last one the op), or None at the
    top."""
    try:
        names = ast.literal_eval(scopes) if scopes else []
    except (ValueError, SyntaxError):
        return None
    return str(names[-2]) if len(names) >= 3 and names[-2] else None  # each scope is a full path


def origins(model: ir.Model) -> dict[str, str]:
    """{node or tensor name: "module M, file.py:N: code"} for every node whose exporter recorded where it came
    from (either part may be missing)."""
    found: dict[str, str] = {}
    for node in model.graph.all_nodes():
        trace = node.metadata_props.get(STACK_TRACE)
        module = _module(node.metadata_props.get(NAME_SCOPES))
        parts = [f"module {module}" if module else None, _user_line(trace) if trace else None]
        line = ", ".join(p for p in parts if p)
        if line:
            for name in (node.name, *(v.name for v in node.outputs)):
                if name:
                    found.setdefault(name, line)
    return found


def located(error: UnsupportedLayer, known: Mapping[str, str]) -> UnsupportedLayer:
    """``error`` with the source line of the layer it names, where the layer is an exporter's node."""
    line = known.get(error.layer)
    if line is None or line in error.reason:
        return error
    return UnsupportedLayer(error.layer, f"{error.reason} (from {line})")
