"""Load and save models: the project checkpoint, TorchScript, torch.export (.pt2), and trusted pickles."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from . import models
from .errors import BadInput
from . import archives, batch_axis
from .batch_axis import BatchAxes
from .files import atomic_write
from .model_state import buffers_kept
from .model_refusals import SHAPE_HELP, does_not_run
from .pickles import unpickle
from .programs import (flatten_inputs, free_batch, load_program, refuse_batch_statistics, refuse_training_mode,
                       static_batch)
from .signature import as_shapes, forward_arguments

CHECKPOINT_FORMAT = "htaf-export/checkpoint"
CHECKPOINT_VERSION = 1
# Name of the JSON file embedded in TorchScript and .pt2 archives (input shape, family, outputs).
SPEC_FILE = "htaf_export.json"

# What torch's readers raise on damaged or foreign archives (they raise many kinds; users need one line).
TORCH_READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                     ImportError, UnicodeDecodeError, pickle.UnpicklingError, zipfile.BadZipFile)


SourceFormat = Literal["checkpoint", "torchscript", "exported_program", "pickle"]


@dataclass
class LoadedModel:
    """A model read from a file, with what the rest of the pipeline needs to know about it.

    ``input_shape`` (per sample, no batch) is None when the file does not say; ``output_names`` None when
    the model does not name its outputs: ``resolve`` fills both in.
    """

    module: nn.Module
    input_shape: list[int] | None
    source_format: SourceFormat
    path: Path
    sha256: str
    family: str = "unknown"
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    output_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    exported_program: Any = None
    extra_input_shapes: list[list[int]] = field(default_factory=list)  # inputs after the first, if any
    input_names: list[str] | None = None
    batch_axes: BatchAxes | None = None  # set when the model's batch is not on axis 0 (made batch-first here)

    @property
    def input_shapes(self) -> list[list[int]]:
        return [self.input_shape, *self.extra_input_shapes] if self.input_shape is not None else []


def resolve(loaded: LoadedModel, input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
            data: Path | None = None) -> LoadedModel:
    """``loaded`` with its input shapes (``input_shape``, one shape or one per input; else what the file
    records; else the shapes of ``data``'s samples) and its output names (what the model declares, else
    named after its output structure). A model with one input calls it ``input``; with more, each is
    named after its argument of ``forward``."""
    from . import outputs
    from .data import npz_sample_shapes

    refuse_batch_statistics(loaded.module, loaded.path)
    arguments = loaded.input_names or forward_arguments(loaded.module)
    names = ["input"] if len(arguments) == 1 else arguments
    shapes = as_shapes(input_shape) or (loaded.input_shapes or None)
    if shapes is None and data is not None:
        shapes = npz_sample_shapes(data, names)
    if shapes is None:
        raise BadInput(f"{loaded.path}: the model does not say its input shape; {SHAPE_HELP}")
    if len(shapes) != len(names):
        raise BadInput(f"{loaded.path}: the model takes {len(names)} input{'s' if len(names) != 1 else ''} "
                       f"({', '.join(arguments)}); give one shape per input (--input-shape once for each)")
    if any(d <= 0 for shape in shapes for d in shape):
        raise BadInput(f"input shape {shapes} must be positive numbers")
    if loaded.source_format == "exported_program" and loaded.input_shapes and shapes != loaded.input_shapes:
        raise BadInput(f"input shape {shapes} differs from the {loaded.input_shapes} the .pt2 program was "
                       f"exported for")
    axes = loaded.batch_axes or batch_axis.moved_axes(loaded.module)  # moved by an earlier resolve: not again
    with buffers_kept(loaded.module):
        if axes is None and loaded.source_format in ("pickle", "checkpoint") and \
                not isinstance(loaded.module, torch.jit.ScriptModule):
            axes = batch_axis.probe_axes(loaded.module, shapes)
            if axes is not None:
                batch_axis.move_with_hooks(loaded.module, axes)
        try:
            with torch.no_grad():
                out = loaded.module(*(torch.zeros(2, *shape) for shape in shapes))
        except Exception as e:  # noqa: BLE001 - whatever the user's forward raises is about the model: exit 2
            raise does_not_run(loaded.module, loaded.path, shapes, e) from None
    return replace(loaded, input_shape=shapes[0], extra_input_shapes=shapes[1:], input_names=names,
                   output_names=outputs.names(out, loaded.output_names), batch_axes=axes)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



def _declared_outputs(module: nn.Module) -> list[str] | None:
    names = getattr(module, "output_names", None)
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None


def _spec_of(module: nn.Module, input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    shapes = as_shapes(input_shape if input_shape is not None else getattr(module, "input_shape", None))
    if shapes is None:
        raise BadInput(f"{type(module).__name__} does not say its input shape: pass input_shape=(...) "
                       f"(per sample, no batch; one per input) or set model.input_shape before saving")
    return {"input_shape": shapes[0] if len(shapes) == 1 else shapes, "shapes": shapes,
            "family": getattr(module, "family", "unknown"), "output_names": _declared_outputs(module)}


def _recordedas_shapes(value: Any) -> tuple[list[int] | None, list[list[int]]]:
    """(first input's shape, the others') from a recorded input_shape: one shape, or one per input."""
    shapes = as_shapes(value)
    return (shapes[0], shapes[1:]) if shapes else (None, [])


def save(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None,
         format: Literal["checkpoint", "torchscript", "pt2"] | None = None,
         input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None) -> Path:
    """Write ``model`` atomically.

    ``checkpoint`` (default) is the project format, readable with ``torch.load(path, weights_only=True)``:
    ``{"format", "version", "arch", "config", "state_dict", "input_shape", "meta"}``; the model's class must
    be a registered architecture (``htaf_export.models.register``; its ``config`` attribute, if any, holds
    the constructor's arguments). ``torchscript`` and ``pt2`` embed the input spec as an extra file.
    ``input_shape`` (per sample; one per input) is needed when the model has no ``input_shape`` attribute.
    Without ``format``, a ``.pt2`` path gets ``pt2`` and any other a checkpoint.
    """
    path = Path(path)
    format = format or ("pt2" if path.suffix == ".pt2" else "checkpoint")
    spec = _spec_of(model, input_shape)
    examples = tuple(torch.zeros(2, *shape) for shape in spec.pop("shapes"))
    if format == "checkpoint":
        arch = getattr(model, "arch", None)
        if arch is None or arch not in models.architectures():
            raise BadInput(f"{type(model).__name__} is not a registered architecture (htaf_export.models.register); "
                           f"save it as a .pt2 program instead: htaf_export.save(model, 'model.pt2')")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "arch": arch,
            "config": dict(getattr(model, "config", {}) or {}),
            "state_dict": {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                           for k, v in model.state_dict().items()},
            "input_shape": spec["input_shape"],
            "meta": dict(meta or {}),
        }
        _check_weights_only({k: v for k, v in payload.items() if k != "state_dict"})
        return atomic_write(path, lambda tmp: torch.save(payload, tmp))
    spec = {k: v for k, v in spec.items() if v is not None}
    extra = {SPEC_FILE: json.dumps({**spec, "meta": dict(meta or {})}, sort_keys=True)}
    if format == "torchscript":
        scripted = torch.jit.trace(model.eval(), examples if len(examples) > 1 else examples[0], strict=False)
        return atomic_write(path, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=extra))
    if format == "pt2":
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model.eval(), examples, dynamic_shapes=tuple({0: batch} for _ in examples))
        return atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
    raise BadInput(f"unknown save format {format!r}; use checkpoint, torchscript or pt2")


def _check_weights_only(obj: dict[str, Any]) -> None:
    """Refuse config/meta that ``torch.load(weights_only=True)`` could not read back (numpy scalars, objects)."""
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except (pickle.PicklingError, pickle.UnpicklingError, TypeError, AttributeError, RuntimeError) as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"a {found.group(1)}" if found else f"an unpicklable value ({type(e).__name__})"
        raise BadInput(f"checkpoint config/meta hold {what}, which torch.load(weights_only=True) cannot read; "
                       f"use plain numbers, strings, lists and dicts") from None


def load(path: str | Path, trust_pickle: bool = False) -> LoadedModel:
    """Read a model file of any supported format; every unusable file raises ``BadInput`` with one line."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"model file {path} does not exist")
    if path.is_dir():
        raise BadInput(f"model path {path} is a directory, not a file")
    size = path.stat().st_size
    if size == 0:
        raise BadInput(f"model file {path} is empty")
    with open(path, "rb") as f:
        head = f.read(4)
    digest = file_sha256(path)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise BadInput(f"model file {path} is a truncated or corrupt archive")
        exported = path.suffix.lower() in (".onnx", ".tflite", ".nir")
        hint = (f"; htaf-export starts from the PyTorch model: 'htaf-export inspect {path.name}' reads an exported "
                f"file, and 'htaf-export validate MODEL ARTIFACT' (model first) checks it") if exported else ""
        raise BadInput(f"model file {path} is not a PyTorch model (checkpoint, TorchScript, .pt2 or pickle){hint}")
    names = archives.members(path)
    try:
        if any(n.endswith("/archive_format") for n in names):
            return _load_exported_program(path, digest)
        if any("/code/" in n for n in names) or any(n.endswith("/constants.pkl") for n in names):
            return _load_torchscript(path, digest)
        archives.refuse_half_written_torchscript(path, names)
        return _load_pickled(path, digest, trust_pickle)
    except BadInput:
        raise
    except TORCH_READ_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"model file {path} cannot be read (truncated or corrupt?): {msg[:200]}") from None


def _rebuilt(program: torch.export.ExportedProgram, path: Path) -> torch.nn.Module:
    """The program as a module; a submodule named like an attribute torch.fx keeps for itself (``meta``,
    ``graph``, ``code``) cannot be rebuilt, and the user is told which one to rename."""
    try:
        return program.module()
    except RuntimeError as e:
        found = re.search(r"nonexistent attribute \S+ of (\S+)", str(e))
        clash = found.group(1).split(".")[-1] if found else None
        if clash is not None and (clash == "meta" or hasattr(torch.fx.GraphModule, clash)):
            raise BadInput(f".pt2 file {path}: a submodule is named {clash!r}, a name torch.fx's GraphModule keeps "
                           f"for itself, so torch cannot rebuild the program; rename it and export again") from None
        raise


def _read_spec(extra: str, path: Path, kind: str) -> dict[str, Any]:
    if not extra:
        return {"input_shape": None}
    try:
        spec = json.loads(extra)
        spec["input_shape"], spec["extra"] = _recordedas_shapes(spec["input_shape"])
    except (ValueError, KeyError, TypeError):
        raise BadInput(f"{kind} file {path} has an unreadable input spec ({SPEC_FILE})") from None
    return spec


def _load_torchscript(path: Path, digest: str) -> LoadedModel:
    extra = {SPEC_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    spec = _read_spec(extra[SPEC_FILE], path, "TorchScript")
    return LoadedModel(module=module.eval(), input_shape=spec["input_shape"], source_format="torchscript",
                       path=path, sha256=digest, family=spec.get("family", "unknown"),
                       output_names=spec.get("output_names"), meta=spec.get("meta", {}),
                       extra_input_shapes=spec.get("extra", []))


def _load_exported_program(path: Path, digest: str) -> LoadedModel:
    extra = {SPEC_FILE: ""}
    program = load_program(path, extra)
    if extra[SPEC_FILE]:
        spec = _read_spec(extra[SPEC_FILE], path, ".pt2")
    else:
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"
                        and n.name in program.graph_signature.user_inputs]
        shapes = [[int(d) for d in n.meta["val"].shape[1:]] for n in placeholders if "val" in n.meta]
        if not shapes or len(shapes) != len(placeholders):
            raise BadInput(f".pt2 file {path}: its inputs are not tensors with known shapes")
        spec = {"input_shape": shapes[0], "extra": shapes[1:], "names": [n.name for n in placeholders]}
    refuse_training_mode(program, path)
    module = _rebuilt(program, path)
    flatten_inputs(module)
    axes, shapes = batch_axis.made_batch_first(program, module)
    if axes is not None:
        spec = {**spec, "input_shape": shapes[0], "extra": shapes[1:]}
    else:
        batch = static_batch(program)
        if batch is not None:
            free_batch(module, path, batch, [spec["input_shape"], *spec.get("extra", [])])
    return LoadedModel(module=module, input_shape=spec["input_shape"], source_format="exported_program",
                       path=path, sha256=digest, family=spec.get("family", "unknown"),
                       output_names=spec.get("output_names"), meta=spec.get("meta", {}),
                       exported_program=program, extra_input_shapes=spec.get("extra", []),
                       input_names=spec.get("names"), batch_axes=axes)


def _load_pickled(path: Path, digest: str, trust_pickle: bool) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise BadInput(f"{path} is a pickled Python object, and unpickling runs code from the file; "
                           f"pass --trust-pickle only if you trust its source") from None
        obj = unpickle(path)
        obj = getattr(obj, "_orig_mod", obj) if type(obj).__name__ == "OptimizedModule" else obj  # torch.compile's
        if not isinstance(obj, nn.Module):
            raise BadInput(f"{path} holds a pickled {type(obj).__name__}, not an nn.Module") from None
        first, more = _recordedas_shapes(getattr(obj, "input_shape", None))
        return LoadedModel(module=obj.eval(), input_shape=first, extra_input_shapes=more,
                           source_format="pickle", path=path, sha256=digest,
                           family=str(getattr(obj, "family", "unknown")), arch=getattr(obj, "arch", None),
                           config=dict(getattr(obj, "config", {}) or {}), output_names=_declared_outputs(obj))
    return _from_checkpoint(obj, path, digest)


def _from_checkpoint(obj: Any, path: Path, digest: str) -> LoadedModel:
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        what = "a state dict or other dictionary" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise BadInput(f"{path} holds {what}, not a model: save the model itself as a torch.export program, "
                       f"e.g. htaf_export.save(model.eval(), 'model.pt2', input_shape=[...])")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise BadInput(f"{path} is checkpoint version {obj.get('version')!r}; this htaf-export reads version "
                       f"{CHECKPOINT_VERSION}")
    missing = [k for k in ("arch", "config", "state_dict", "input_shape") if k not in obj]
    if missing:
        raise BadInput(f"checkpoint {path} lacks {', '.join(missing)}")
    try:
        module = models.build(obj["arch"], obj["config"])
    except models.UnknownArchitecture as e:
        raise BadInput(f"checkpoint {path} names {e.args[0]} (an architecture registered by your own code is not "
                       f"known here: save the model as a .pt2 program, htaf_export.save(model, 'model.pt2'))") from None
    except TypeError as e:
        raise BadInput(f"checkpoint {path} has a config that {obj['arch']} does not accept: {e}") from None
    state = obj["state_dict"]
    if isinstance(state, dict):
        # Extra state (HTAF's alpha/beta, a binary layer's frozen flag) may be absent from older
        # checkpoints; the freshly built module's values stand in for it.
        state = {**{k: v for k, v in module.state_dict().items() if k.endswith("._extra_state")}, **state}
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(lines[:2])[:300] if lines else type(e).__name__
        raise BadInput(f"checkpoint {path}: weights do not fit architecture {obj['arch']}: {detail}") from None
    meta = dict(obj.get("meta", {}))
    first, more = _recordedas_shapes(obj["input_shape"])
    return LoadedModel(module=module.eval(), input_shape=first, extra_input_shapes=more,
                       source_format="checkpoint", path=path, sha256=digest, family=str(getattr(module, "family", "unknown")),
                       arch=obj["arch"], config=dict(obj["config"]), output_names=_declared_outputs(module),
                       meta=meta)
