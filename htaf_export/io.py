"""Load and save models: the project checkpoint, TorchScript, torch.export (.pt2), and trusted pickles."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import models
from .errors import BadInput
from .files import atomic_write

CHECKPOINT_FORMAT = "htaf-export/checkpoint"
CHECKPOINT_VERSION = 1
# Name of the JSON file embedded in TorchScript and .pt2 archives (input shape, family, outputs).
SPEC_FILE = "htaf_export.json"

# What torch's readers raise on damaged or foreign archives (they raise many kinds; users need one line).
TORCH_READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                     ImportError, UnicodeDecodeError, pickle.UnpicklingError, zipfile.BadZipFile)
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, NotImplementedError, RuntimeError, ValueError)

SourceFormat = Literal["checkpoint", "torchscript", "exported_program", "pickle"]


@dataclass
class LoadedModel:
    """A model read from a file, with what the rest of the pipeline needs to know about it."""

    module: nn.Module
    input_shape: list[int]
    source_format: SourceFormat
    path: Path
    sha256: str
    family: str = "unknown"
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    output_names: list[str] = field(default_factory=lambda: ["logits"])
    meta: dict[str, Any] = field(default_factory=dict)
    exported_program: Any = None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _spec_of(module: nn.Module) -> dict[str, Any]:
    shape = getattr(module, "input_shape", None)
    if shape is None:
        raise BadInput(f"{type(module).__name__} has no input_shape attribute; set model.input_shape "
                       f"(without the batch dimension) before saving")
    return {"input_shape": [int(d) for d in shape], "family": getattr(module, "family", "unknown"),
            "output_names": list(getattr(module, "output_names", ("logits",)))}


def save(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None,
         format: Literal["checkpoint", "torchscript", "pt2"] = "checkpoint") -> Path:
    """Write ``model`` atomically.

    ``checkpoint`` (default) is the project format, readable with ``torch.load(path, weights_only=True)``:
    ``{"format", "version", "arch", "config", "state_dict", "input_shape", "meta"}``; the model must be
    a registered architecture. ``torchscript`` and ``pt2`` embed the input spec as an extra file.
    """
    path = Path(path)
    spec = _spec_of(model)
    if format == "checkpoint":
        arch = getattr(model, "arch", None)
        if arch is None or arch not in models.architectures():
            raise BadInput(f"{type(model).__name__} is not a registered architecture; "
                           f"save it as format='torchscript' or 'pt2' instead")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "arch": arch,
            "config": dict(model.config),  # type: ignore[attr-defined]
            "state_dict": {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                           for k, v in model.state_dict().items()},
            "input_shape": spec["input_shape"],
            "meta": dict(meta or {}),
        }
        _check_weights_only({k: v for k, v in payload.items() if k != "state_dict"})
        return atomic_write(path, lambda tmp: torch.save(payload, tmp))
    extra = {SPEC_FILE: json.dumps({**spec, "meta": dict(meta or {})}, sort_keys=True)}
    if format == "torchscript":
        scripted = torch.jit.trace(model.eval(), torch.zeros(2, *spec["input_shape"]))
        return atomic_write(path, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=extra))
    if format == "pt2":
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model.eval(), (torch.zeros(2, *spec["input_shape"]),),
                                      dynamic_shapes=({0: batch},))
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
        raise BadInput(f"model file {path} is not a PyTorch model (checkpoint, TorchScript, .pt2 or pickle)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = _first_damaged_member(archive)
    except ZIP_ERRORS as e:  # a damaged directory
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"model file {path} is a corrupt archive: {msg[:200]}") from None
    if damaged is not None:
        raise BadInput(f"model file {path} is corrupt: archive member {damaged} fails its CRC-32 check")
    try:
        if any(n.endswith("/archive_format") for n in names):
            return _load_exported_program(path, digest)
        if any("/code/" in n for n in names) or any(n.endswith("/constants.pkl") for n in names):
            return _load_torchscript(path, digest)
        return _load_pickled(path, digest, trust_pickle)
    except BadInput:
        raise
    except TORCH_READ_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"model file {path} cannot be read (truncated or corrupt?): {msg[:200]}") from None


def _first_damaged_member(archive: zipfile.ZipFile) -> str | None:
    """Name of the first member whose bytes do not match its recorded CRC-32, else None.

    torch's own reader does not check the CRCs, so a flipped byte in a weight tensor would
    otherwise load silently. Members written without a CRC (recorded as 0) are not checked.
    """
    for info in archive.infolist():
        if info.CRC == 0 or info.is_dir():
            continue
        try:
            with archive.open(info) as f:
                while f.read(1 << 20):
                    pass
        except zipfile.BadZipFile:
            return info.filename
    return None


def _read_spec(extra: str, path: Path, kind: str) -> dict[str, Any]:
    if not extra:
        raise BadInput(f"{kind} file {path} carries no input spec ({SPEC_FILE}); "
                       f"save it with htaf_export.save(model, path, format=...)")
    try:
        spec = json.loads(extra)
        spec["input_shape"] = [int(d) for d in spec["input_shape"]]
    except (ValueError, KeyError, TypeError):
        raise BadInput(f"{kind} file {path} has an unreadable input spec ({SPEC_FILE})") from None
    return spec


def _load_torchscript(path: Path, digest: str) -> LoadedModel:
    extra = {SPEC_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    spec = _read_spec(extra[SPEC_FILE], path, "TorchScript")
    return LoadedModel(module=module.eval(), input_shape=spec["input_shape"], source_format="torchscript",
                       path=path, sha256=digest, family=spec.get("family", "unknown"),
                       output_names=spec.get("output_names", ["logits"]), meta=spec.get("meta", {}))


def _load_exported_program(path: Path, digest: str) -> LoadedModel:
    extra = {SPEC_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    if extra[SPEC_FILE]:
        spec = _read_spec(extra[SPEC_FILE], path, ".pt2")
    else:
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"
                        and n.name in program.graph_signature.user_inputs]
        if len(placeholders) != 1:
            raise BadInput(f".pt2 file {path} has {len(placeholders)} inputs; htaf-export handles one input tensor")
        spec = {"input_shape": [int(d) for d in placeholders[0].meta["val"].shape[1:]]}
    return LoadedModel(module=program.module(), input_shape=spec["input_shape"], source_format="exported_program",
                       path=path, sha256=digest, family=spec.get("family", "unknown"),
                       output_names=spec.get("output_names", ["logits"]), meta=spec.get("meta", {}),
                       exported_program=program)


def _load_pickled(path: Path, digest: str, trust_pickle: bool) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise BadInput(f"{path} is a pickled Python object, and unpickling runs code from the file; "
                           f"pass --trust-pickle only if you trust its source") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(obj, nn.Module):
            raise BadInput(f"{path} holds a pickled {type(obj).__name__}, not an nn.Module") from None
        spec = _spec_of(obj)
        return LoadedModel(module=obj.eval(), input_shape=spec["input_shape"], source_format="pickle", path=path,
                           sha256=digest, family=spec["family"], arch=getattr(obj, "arch", None),
                           config=dict(getattr(obj, "config", {})), output_names=spec["output_names"])
    return _from_checkpoint(obj, path, digest)


def _from_checkpoint(obj: Any, path: Path, digest: str) -> LoadedModel:
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        what = "a state dict or other dictionary" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise BadInput(f"{path} holds {what}, not an htaf-export checkpoint; write one with htaf_export.save")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise BadInput(f"{path} is checkpoint version {obj.get('version')!r}; this htaf-export reads version "
                       f"{CHECKPOINT_VERSION}")
    missing = [k for k in ("arch", "config", "state_dict", "input_shape") if k not in obj]
    if missing:
        raise BadInput(f"checkpoint {path} lacks {', '.join(missing)}")
    try:
        module = models.build(obj["arch"], obj["config"])
    except models.UnknownArchitecture as e:
        raise BadInput(f"checkpoint {path} names {e.args[0]}") from None
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
    return LoadedModel(module=module.eval(), input_shape=[int(d) for d in obj["input_shape"]],
                       source_format="checkpoint", path=path, sha256=digest, family=module.family,
                       arch=obj["arch"], config=dict(obj["config"]), output_names=list(module.output_names),
                       meta=meta)
