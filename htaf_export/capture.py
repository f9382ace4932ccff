"""Capture: hardened module → the canonical ONNX graph (the IR every converter reads).

Each exact step is one node in the ``htaf`` domain (``Heaviside`` for {0,1}, ``Sign`` for {−1,+1})
with inputs (X, threshold) and attribute ``tie``; its output tensor is named after the module path
of its site (``path@k`` for the k-th call of a site called more than once, as in unrolled SNNs).
Weights stay float here (binary ones are exact ±1); converters decide how to store them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
import onnx
from onnxscript.optimizer import fold_constants
from torch import nn

from . import adaptive_pool, outputs
from .contracts import StepSpec
from .errors import BadInput, UnsupportedLayer
from .files import silenced
from .nn.modules import set_eval
from .origins import origins
from .ops import HTAF_DOMAIN, OPSET, STEP_OPS
from .passes.fold_weights import FoldWeightExpressions
from .passes.conv_bias import DropMalformedZeroBiases
from .passes.einsum import EinsumAsMatMul
from .passes.plain_steps import RecognisePlainSteps
from .signature import as_shapes

INPUT_NAME = "input"


@dataclass(frozen=True)
class Capture:
    """The IR and what converters and validation need to know about it.

    ``model`` is shared by every converter of one export: converters work on a copy (``ir_copy``).
    """

    model: ir.Model
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    steps: tuple[StepSpec, ...] = ()
    streaming: bool = False
    notes: tuple[str, ...] = ()  # what capture changed that a user should know (weights snapped to ±scale)
    origins: Mapping[str, str] = field(default_factory=dict)  # node/tensor name → the user's source line

    @property
    def step_tensors(self) -> list[str]:
        return [s.tensor for s in self.steps]

    def ir_copy(self) -> ir.Model:
        return ir.from_proto(ir.to_proto(self.model))


class _StreamingEntry(nn.Module):
    """Exports one time step of a spiking model with the membrane state as explicit inputs and outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *v: torch.Tensor):
        return self.model.step(x, *v)


def state_names(model: nn.Module) -> list[str]:
    """Names of the membrane-state tensors of a spiking model, one per LIF layer."""
    return [f"{name}.v" for name, m in model.named_modules() if type(m).__name__ == "LIF"]


class _FlatOutputs(nn.Module):
    """A TorchScript model whose outputs are dicts or nested lists, returning them as one flat tuple (the
    TorchScript exporter knows no dicts); traced, so it is TorchScript again."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *xs: torch.Tensor):
        return tuple(outputs.leaves(self.model(*xs)))


def _flat_tuple(out) -> bool:
    return isinstance(out, torch.Tensor) or (isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out))


def _entry(model: nn.Module, input_shapes: Sequence[Sequence[int]], output_names: Sequence[str], streaming: bool,
           input_names: Sequence[str] | None):
    batch = torch.export.Dim("batch", min=1)
    xs = tuple(torch.zeros(2, *shape) for shape in input_shapes)
    x = xs[0]
    if not streaming:
        if isinstance(model, torch.jit.ScriptModule):
            with torch.no_grad():
                flat = _flat_tuple(model(*xs))
            if not flat:
                model = torch.jit.trace(_FlatOutputs(model), xs, strict=False)
        names = list(input_names) if input_names and len(input_names) == len(xs) else (
            [INPUT_NAME] if len(xs) == 1 else [f"{INPUT_NAME}_{k}" for k in range(len(xs))])
        return model, xs, names, list(output_names), tuple({0: batch} for _ in xs)
    if not hasattr(model, "step") or not hasattr(model, "initial_state"):
        raise BadInput("streaming export needs a spiking model with step() and initial_state() (an SNN)")
    states = state_names(model)
    v = tuple(model.initial_state(2))
    dyn = ({0: batch}, tuple({0: batch} for _ in v))  # forward(x, *v): the state is one varargs tuple
    return (_StreamingEntry(model), (x, *v), [INPUT_NAME, *states],
            [output_names[0], *(f"{s}_next" for s in states)], dyn)


def _scripted_hint(module: torch.jit.ScriptModule) -> str:
    """What to do when the failing model is scripted code with loops or branches, which the exporter often cannot
    follow while a trace of the same model (the loop unrolled) or a torch.export program captures."""
    graph = getattr(module, "inlined_graph", None)
    if graph is None or not any(n.kind() in ("prim::Loop", "prim::If") for n in graph.nodes()):
        return ""
    return ("; the model is scripted code with loops or branches: save it with torch.jit.trace or torch.export "
            "(.pt2) instead")


def _legacy_export(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str]) -> ir.Model:
    """TorchScript modules: torch's TorchScript-based exporter (the dynamo exporter cannot read them)."""
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    try:
        # on failure the exporter dumps the whole TorchScript graph to standard output
        with silenced(1), adaptive_pool.legacy_symbolics(OPSET):
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET, input_names=input_names,
                              output_names=output_names, dynamic_axes=axes)
    except RuntimeError as e:  # the TorchScript exporter's errors (OnnxExporterError among them)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.split(r",? *(?:got )?'?%", first)[0]  # the rest dumps TorchScript IR
        first = first.split(" Please feel free to request support")[0].rstrip(".")  # torch's plea: no way out
        hint = _scripted_hint(module) or ("; save the model as a torch.export program (.pt2) instead, which does "
                                          "not go through this exporter")
        raise BadInput(f"cannot capture the TorchScript model to ONNX: {first[:200]}{hint}") from None
    # The TorchScript exporter records no intermediate shapes; inferred ones let shape arithmetic (chunk) fold.
    return ir.from_proto(onnx.shape_inference.infer_shapes(onnx.load_from_string(buf.getvalue()), data_prop=True))


def _torch_export(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str], dyn) -> ir.Model:
    # The exporter prints progress and warns about optional packages; neither helps our users.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            if isinstance(module, torch.jit.ScriptModule):
                return _legacy_export(module, args, input_names, output_names)
            program = torch.onnx.export(module, args, dynamo=True, optimize=False, opset_version=OPSET,
                                        input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dyn, verbose=False, report=False,
                                        custom_translation_table=adaptive_pool.TRANSLATIONS)
        except RuntimeError as e:  # OnnxExporterError wraps every failure; pages long, users need the layer and op
            raise _explain_failure(module, args, dyn, e) from None
        finally:
            logging.disable(previous)
    return program.model


def _explain_failure(module: nn.Module, args: tuple, dyn, error: Exception) -> BadInput:
    """Turn an exporter failure into one line naming the module (layer) and the operation."""
    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(chain)
    node_match = re.search(r"translating node %(\w+)", text)
    op_match = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text)
    if node_match:
        op = op_match.group(1) if op_match else "this operation"
        layer = node_match.group(1)
        # Best effort: torch.export's errors are RuntimeErrors; no node of that name is StopIteration.
        with contextlib.suppress(RuntimeError, StopIteration), contextlib.redirect_stdout(io.StringIO()):
            program = torch.export.export(module, args, dynamic_shapes=dyn)
            # The exporter decomposes before translating, so match the failing node's name by prefix too.
            base = re.sub(r"_\d+$", "", node_match.group(1))
            node = next(n for n in program.graph.nodes if n.name == node_match.group(1) or n.name.startswith(base))
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if stack:
                layer = f"{stack[-1][0].removeprefix('model.')} ({str(stack[-1][1]).rsplit('.', 1)[-1]})"
        return UnsupportedLayer(layer, f"ONNX has no translation for {op}")
    lifted = re.search(r"fake tensor in the exported program constant.*?attribute: ([\w.]+?)\.lifted_tensor", text, re.S)
    if lifted:  # BinaryNet.pytorch's ``input.data = Binarize(input.data)``, ``self.weight.data = …``
        return UnsupportedLayer(lifted.group(1), "its forward assigns to a tensor's .data (or keeps a tensor it made "
                                "as an attribute), which torch.export cannot trace; compute the binary values as "
                                "expressions instead (x = torch.where(x >= 0, 1., -1.), and the same of the weight)")
    last = [line for line in chain[-1].strip().splitlines() if line.strip()]
    return BadInput(f"cannot capture the model to ONNX: {(last[0] if last else type(error).__name__)[:300]}")


def _site_of(node: ir.Node) -> str:
    """The module path a node came from: the dynamo exporter's name scopes, or the legacy '/a/b/Op' name."""
    if "pkg.torch.onnx.name_scopes" not in node.metadata_props and (node.name or "").startswith("/"):
        # a step in the root module's forward ('/GreaterOrEqual') is the root's step, as torch.export names it
        return ".".join(node.name.strip("/").split("/")[:-1]).removeprefix("model.") or "step"
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    try:
        names = [s.strip().strip("'\"") for s in scopes.strip("[]").split(",")]
    except AttributeError:
        names = []
    path = names[-2] if len(names) >= 2 else ""
    if path:
        return path.removeprefix("model.")
    # a step written in the root module's forward: the exporter's name for it ("ge", "gt_1")
    return names[-1] if names and names[-1] else node.name


def _name_steps(model: ir.Model) -> list[StepSpec]:
    """Name each step output after its site, in graph order."""
    nodes = [n for n in model.graph if n.domain == HTAF_DOMAIN and n.op_type in STEP_OPS]
    sites = [_site_of(n) for n in nodes]
    counts = {s: sites.count(s) for s in sites}
    seen: dict[str, int] = {}
    steps = []
    for node, site in zip(nodes, sites):
        k = seen.get(site, 0)
        seen[site] = k + 1
        out = node.outputs[0]
        if not out.is_graph_output():
            out.name = site if counts[site] == 1 else f"{site}@{k}"
        node.name = f"{out.name}/{node.op_type}"
        steps.append(StepSpec(out.name, site, node.op_type, node.attributes["tie"].as_string(), k))
    return steps


FOLD_LIMIT = 1 << 26  # elements: onnxscript's default (8192) left XNOR-Net's |w|.mean() of a 3x3x32x32 conv computed


def fold_all_constants(model: ir.Model) -> None:
    """Evaluate every subgraph of constants, whatever its size: converters need constant weights and scales."""
    fold_constants(model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)


def cleanup(model: ir.Model, fold: bool = True) -> ir.Model:
    """Fold constants (unless ``fold`` is False) and remove what the exporter leaves behind.

    Steps are never folded (their domain has no evaluator); converters that add subgraphs meant to
    stay in the file, such as weight unpacking, clean up with ``fold=False``.
    """
    if fold:
        fold_all_constants(model)
    ir.passes.Sequential(
        common_passes.IdentityEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.ClearMetadataAndDocStringPass(),
        common_passes.TopologicalSortPass(),
    )(model)
    return model


def capture(hardened: nn.Module, input_shape: Sequence[int] | Sequence[Sequence[int]],
            output_names: Sequence[str] = ("logits",), streaming: bool = False,
            input_names: Sequence[str] | None = None) -> Capture:
    """Export a hardened module to the IR: ``input_shape`` is one per-sample shape, or one per input (named
    ``input_names``). ``streaming`` exports one SNN time step with explicit state."""
    set_eval(hardened)
    shapes = as_shapes(input_shape)
    module, args, in_names, out_names, dyn = _entry(hardened, shapes, output_names, streaming, input_names)
    model = _torch_export(module, args, in_names, out_names, dyn)
    lines = origins(model)
    # Traced programs (TorchScript, .pt2) hold their steps as plain comparisons: lift them to htaf ops.
    EinsumAsMatMul()(model)  # first: a weight binarized inline then feeds a MatMul, and is folded as one
    folded = FoldWeightExpressions()(model).records
    fold_all_constants(model)
    DropMalformedZeroBiases()(model)
    RecognisePlainSteps()(model)
    steps = _name_steps(model)
    cleanup(model)
    # Steps may have been merged by common-subexpression elimination (identical calls); keep those left.
    present = {n.outputs[0].name for n in model.graph if n.domain == HTAF_DOMAIN}
    steps = [s for s in steps if s.tensor in present]
    model.graph.name = type(hardened).__name__
    model.producer_name = "htaf-export"
    notes = tuple(f"weights {f.weight} snapped to exactly ±scale per channel (largest relative change "
                  f"{f.snapped_change:.1e}: the straight-through form w + (α·sign(w) − w) rounds α by an ulp)"
                  for f in folded if f.snapped_change)
    if any(n.op_type == "Sign" and n.domain == "" for n in model.graph):
        notes += ("torch.sign is three-valued (sign(0) = 0), so it is not read as a step: the layers it feeds "
                  "stay float and its decisions are checked through the outputs only; --sign-as-step reads it as "
                  "a ±1 step (sign(0) = +1, as larq and LCE do), as torch.where(x >= 0, 1.0, -1.0) is",)
    if any(n.op_type == "Sigmoid" and n.domain == "" for n in model.graph):
        notes += ("a sigmoid is exported as it is (float): only the HTAF form σ(α·u + β·tanh u) is read as a step; "
                  "a sigmoid that stands for one (σ(k·x), k large) is hardened when written as a comparison "
                  "(x >= 0) or an htaf_export.nn.HTAF",)
    return Capture(model, tuple(in_names), tuple(out_names), tuple(steps), streaming, notes, lines)
