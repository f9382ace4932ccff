"""A readable account of a model: family, step sites, binary layers, parameters and the bits they need."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .capture import capture
from .contracts import PACKED_WEIGHTS
from .data import Dataset
from .errors import BadInput, UnsupportedLayer
from .harden import HardenResult, Site, harden, record_every_step, unrecorded_tie_note
from .harden_traced import type_name
from .io import LoadedModel
from .nn.binary import BinaryWeights
from .passes.util import const_array
from . import metadata as md
from .recommend import Recommendation, recommend
from .targets import TARGETS, ExportOptions

FLOAT_BITS = 32


@dataclass
class LayerInfo:
    """Parameters held directly by one module (not its children) and the bits they need."""

    name: str
    kind: str
    binary: bool
    params: int
    one_bit: int  # parameters stored as 1 bit (binary weights)

    @property
    def bits(self) -> int:
        return self.one_bit + (self.params - self.one_bit) * FLOAT_BITS


@dataclass
class ModelSummary:
    loaded: LoadedModel
    sites: list[Site]
    layers: list[LayerInfo]
    hardening: HardenResult | None = None
    notes: list[str] = field(default_factory=list)
    recommendation: Recommendation | None = None

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def bits(self) -> int:
        return sum(layer.bits for layer in self.layers)


def _traced_types(module: torch.nn.Module) -> dict[str, str]:
    """Module path → the class name it had, for a torch.export program (whose submodules are plain ``Module``s)."""
    graph = getattr(module, "graph", None)
    if not isinstance(module, torch.fx.GraphModule) or graph is None:
        return {}
    types: dict[str, str] = {}
    for node in graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(str(path), type_name(kind))
    return types


def layer_table(module: torch.nn.Module, packed: set[str] | None = None) -> list[LayerInfo]:
    """Each module with parameters; binary: an ``htaf_export.nn`` binary layer, or one named in ``packed``."""
    layers, traced = [], _traced_types(module)
    for name, m in module.named_modules():
        # Parameters plus float buffers (batch-norm statistics, frozen scales): all of them ship.
        own = list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False) if b.is_floating_point()]
        count = sum(t.numel() for t in own)
        if count == 0:
            continue
        binary = isinstance(m, BinaryWeights) or (name in (packed or ()) and hasattr(m, "weight"))
        one_bit = m.weight.numel() if binary else 0
        kind = getattr(m, "original_name", None) or traced.get(name) or type(m).__name__
        layers.append(LayerInfo(name or "(root)", kind, binary, count, one_bit))
    return layers


def summarize(loaded: LoadedModel, data: Dataset | None = None, tie: str | None = None, recommend_target: bool = False,
              sign_as_step: bool = False) -> ModelSummary:
    """Inspect a loaded model; with data, harden a copy to measure the gap (and accuracy with labels);
    ``recommend_target`` (a resolved model): time its ONNX files here and recommend a target; ``sign_as_step``:
    as ``harden``'s."""
    x = None if data is None else tuple(torch.from_numpy(a) for a in data.x) if isinstance(data.x, tuple) \
        else torch.from_numpy(data.x)
    y = torch.from_numpy(data.y) if data is not None and data.y is not None else None
    shapes = loaded.input_shapes or None
    result = harden(loaded.module, x, y, tie=tie, input_shapes=shapes, sign_as_step=sign_as_step)
    if loaded.source_format == "pickle" and shapes:  # steps written by hand show only in its traced program
        result = record_every_step(result, shapes, [], every=True)
    traced = loaded.source_format in ("torchscript", "exported_program")
    summary = ModelSummary(loaded, result.sites, layer_table(loaded.module), result if data is not None else None)
    note = unrecorded_tie_note(result.sites, tie)
    if note:
        summary.notes.append(note)
    if loaded.batch_axes is not None:
        summary.notes.append(loaded.batch_axes.note(loaded.input_names or ["input"], loaded.input_shapes,
                                                    loaded.output_names or [], "an export"))
    if not (recommend_target or (traced and shapes)):
        return summary
    try:
        cap = capture(result.model, loaded.input_shapes, loaded.output_names, input_names=loaded.input_names)
        onnx_file = TARGETS["onnx"].function("converter")(cap, {md.TARGET: "onnx"}, ExportOptions())
    except (BadInput, UnsupportedLayer) as e:
        if traced:
            summary.notes.append("binary layers are not recognisable inside a traced graph that does not export; "
                                 "bits assume float weights")
        summary.notes.append(f"{'no target recommendation: ' if recommend_target else ''}the model does not "
                             f"export ({e})")
        return summary
    if traced:  # a traced graph's modules are plain: its binary layers are those the ONNX export packs
        summary.sites = summary.sites + _captured_sites(cap, {s.name for s in summary.sites})
        packed = {r.layer for r in onnx_file.rows if r.became == PACKED_WEIGHTS}
        summary.layers = layer_table(loaded.module, packed)
        summary.notes.append("binary layers found as the ONNX export finds them (±1 weights, packed to 1 bit)")
    if recommend_target:
        summary.recommendation = recommend(cap, {"onnx": onnx_file.data})
    return summary


def _captured_sites(cap, known: set[str]) -> list[Site]:
    """The steps only the captured graph shows (a TorchScript trace's plain comparisons), as sites: its threshold
    where one number holds for every unit, else ``None`` (shown as "?")."""
    found = []
    producers = {n.outputs[0].name: n for n in cap.model.graph if n.outputs}
    for spec in cap.steps:  # by tensor: a trace's steps share the name "step", one call each
        if spec.site in known or spec.tensor in known:
            continue
        node = producers.get(spec.tensor)
        theta = const_array(node.inputs[1]) if node is not None and len(node.inputs) > 1 else None
        one = theta is not None and theta.size > 0 and bool((theta == theta.reshape(-1)[0]).all())
        found.append(Site(spec.tensor, spec.levels, float(theta.reshape(-1)[0]) if one else None, spec.tie,  # type: ignore[union-attr]
                          "step", how="exact step in the captured graph"))
        known.add(spec.tensor)
    return found


def render(summary: ModelSummary, console: Console) -> None:
    ld = summary.loaded
    # escape: "[batch, 64]" (or a path with brackets) would otherwise be eaten as rich markup.
    console.print(f"[bold]{escape(str(ld.path))}[/bold]"
                  + escape(f"  format={ld.source_format}  family={ld.family}"
                           + (f"  arch={ld.arch}" if ld.arch else "")
                           + f"  input=[batch, {', '.join(map(str, ld.input_shape))}]"
                           + f"  outputs={', '.join(ld.output_names)}"))

    sites = Table(title="Step sites", title_justify="left")
    for col in ("site", "levels", "threshold", "tie", "trained as", "found as"):
        sites.add_column(col, no_wrap=col == "site")  # names are never cut, narrow terminals wrap the rest
    gap_by_name = {g.name: g for g in (summary.hardening.gaps if summary.hardening else [])}
    if gap_by_name:
        sites.add_column("unsaturated (|HTAF−step|>0.01)", justify="right")
    for s in summary.sites:
        trained = (f"HTAF α={s.alpha:g} β={s.beta:g}" + (f" {s.mode}" if s.mode else "")
                   if s.was == "htaf" and s.alpha is not None else s.was)
        row = [escape(s.name), s.levels, "?" if s.threshold is None else f"{s.threshold:g}", s.tie or "undeclared", trained,
               s.how]
        if gap_by_name:
            g = gap_by_name.get(s.name)
            row.append(f"{g.fraction:.2%} of {g.count:,}" if g else "-")
        sites.add_row(*row)
    console.print(sites)

    layers = Table(title="Layers with parameters", title_justify="left")
    for col, just in (("layer", "left"), ("type", "left"), ("binary weights", "left"), ("parameters", "right"),
                      ("bits needed", "right"), ("as float32", "right")):
        layers.add_column(col, justify=just, no_wrap=col in ("layer", "type"))  # type: ignore[arg-type]
    for layer in summary.layers:
        layers.add_row(layer.name, layer.kind, "yes (1 bit)" if layer.binary else "no", f"{layer.params:,}",
                       _size(layer.bits), _size(layer.params * FLOAT_BITS))
    total_float = summary.params * FLOAT_BITS
    layers.add_row("[bold]total[/bold]", "", "", f"[bold]{summary.params:,}[/bold]", f"[bold]{_size(summary.bits)}[/bold]",
                   f"{_size(total_float)} ({total_float / max(summary.bits, 1):.1f}x)")
    console.print(layers)

    h = summary.hardening
    if h is not None and h.smooth_accuracy is not None:
        console.print(f"accuracy: as trained {h.smooth_accuracy:.2%}, hardened {h.hardened_accuracy:.2%} "
                      f"(change {100 * (h.hardened_accuracy - h.smooth_accuracy):+.2f} points)")
    for note in summary.notes:
        console.print(f"note: {note}")
    if summary.recommendation is not None:
        console.print(escape(summary.recommendation.line()))


def _size(bits: int) -> str:
    n = bits / 8
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} MiB"
