"""The library API of the one-command pipeline: load → harden → capture → convert → finish → write → validate.

Each stage is a plain function with typed input and output (``contracts``); this module only strings them
together. Rendering (console, JSON, HTML) lives in ``console`` and ``report``; the command line in ``cli``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .version import __version__
from . import metadata as md
from .capture import Capture, capture
from .contracts import ORACLE_TIES, Conversion
from .data import Batches, Dataset, NpzBatches, digits
from .errors import BadInput, UnsupportedLayer
from .origins import located
from .files import atomic_write_bytes, check_writable
from .harden import HardenResult, harden, record_every_step, unrecorded_tie_note
from .io import LoadedModel, load, resolve
from .nn.modules import step_modules
from .reference import run_reference
from .runtimes import ArtifactInfo, backends_for, read_artifact
from .signature import as_shapes
from .targets import ExportOptions, Target, target as target_named
from .parity import ParityReport, Tolerance
from .overlap import ChildPlan, worth_overlapping
from .recommend import Recommendation, recommend
from .validate import validate

if TYPE_CHECKING:
    from .runtimes.onnxruntime import GraphSteps
    from .workers import ModelRecipe

GENERATED_SAMPLES = 512
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExportResult:
    """What one export produced: the file, the hardening record, the converter's summary, the parity report."""

    artifact: Path
    target: str
    hardening: HardenResult
    conversion: Conversion
    report: ParityReport | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)
    recommendation: Recommendation | None = None

    def to_dict(self) -> dict:
        return {"target": self.target, **self.conversion.to_dict(),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "recommendation": self.recommendation.to_dict() if self.recommendation else None}


def default_data(input_shape: Sequence[int] | Sequence[Sequence[int]], data_path: Path | None,
                 names: Sequence[str] = ("input",)) -> Dataset | Batches:
    """The user's .npz (streamed batch by batch); else the bundled digits for models with one digits-shaped
    input; else seeded noise of the input shape (one array per input)."""
    shapes = as_shapes(input_shape)
    if data_path is not None:
        return NpzBatches(data_path, shapes, names)
    if len(shapes) == 1 and int(np.prod(shapes[0])) == 64:
        return digits("all", shapes[0])
    rng = np.random.default_rng(0)
    arrays = tuple(rng.standard_normal((GENERATED_SAMPLES, *shape)).astype(np.float32) for shape in shapes)
    return Dataset(arrays[0] if len(arrays) == 1 else arrays, None,
                   f"generated: {GENERATED_SAMPLES} standard normal samples (seed 0)")


def provenance(loaded: LoadedModel, target: Target, options: ExportOptions) -> dict[str, str]:
    """Where the artifact came from, as stored in its metadata."""
    return md.encode({
        md.VERSION: __version__,
        md.TARGET: target.name,
        md.SOURCE_SHA256: loaded.sha256,
        md.SOURCE_FORMAT: loaded.source_format,
        md.FAMILY: loaded.family,
        md.ARCH: loaded.arch or "",
        md.INPUT_SHAPE: loaded.input_shape if not loaded.extra_input_shapes else loaded.input_shapes,
        md.SNN_MODE: options.snn_mode,
    })


def output_path(loaded: LoadedModel, target: Target, output: str | Path | None) -> Path:
    named = loaded.path.with_suffix(target.default_suffix)
    out = Path(output) if output is not None else named
    if str(output or "").endswith(("/", "\\")) and not out.is_dir():
        raise BadInput(f"output folder {output} does not exist")
    if out.is_dir():  # -o DIR: the default name, in that folder
        out = out / named.name
    check_suffix(out, target)
    return out


def check_suffix(out: Path, target: Target) -> None:
    if out.suffix != target.suffix:
        raise BadInput(f"output {out} must end in {target.suffix} for target {target.name}")


NEAR_TIE = Tolerance().flip_margin


def step_oracle(hardened: nn.Module, cap: Capture) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``{input: array} -> {step tensor: array}`` from the hardened model; steps it cannot record (a TorchScript
    source has no Step modules to hook) from the IR run in ONNX Runtime. NaN marks a bit whose pre-activation is
    within ``NEAR_TIE`` of its threshold, which float layers before it may decide either way; ``ORACLE_TIES`` +
    the tensor holds the bits on exact ties only (NaN elsewhere), to tell a step from a sign that is 0 there."""
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in cap.input_names)
        ref = run_reference(hardened, tensors, list(cap.output_names))
        found = {}
        for s in (s for s in cap.steps if (s.site, s.call) in ref.steps):
            pre, bits = ref.preactivations[(s.site, s.call)], ref.steps[(s.site, s.call)]
            found[s.tensor] = np.where(np.abs(pre) <= NEAR_TIE, np.float32(np.nan), bits)
            found[ORACLE_TIES + s.tensor] = np.where(pre == 0, bits, np.float32(np.nan))
        missing = [s.tensor for s in cap.steps if s.tensor not in found]
        if missing:
            from .runtimes.onnxruntime import ir_session

            found.update(ir_session(cap.model, missing)(inputs))
        return found

    return run


def convert(cap: Capture, target: Target, provenance_: Mapping[str, str], options: ExportOptions,
            hardened: nn.Module) -> Conversion:
    """The target's converter, then its runtime finishing stage (if any), which may run ``hardened``."""
    if options.streaming and target.name != "onnx":
        raise BadInput("--snn-mode streaming is available for --target onnx only")
    try:
        conversion = target.function("converter")(cap, provenance_, options)
    except UnsupportedLayer as e:
        raise located(e, cap.origins) from None
    if target.finish:
        conversion = target.function("finish")(conversion, cap, options, step_oracle(hardened, cap))
    return replace(conversion, notes=(*cap.notes, *conversion.notes))


def export(model: str | Path | LoadedModel, target: str, output: str | Path | None = None, *, tie: str | None = None,
           data: Path | None = None, input_shape: Sequence[int] | None = None, validate_artifact: bool = True,
           portable: bool = False, snn_mode: str = "unrolled", lce_kernel: str = "auto", trust_pickle: bool = False,
           device: str = "all", tolerance: Tolerance | None = None, progress: Progress | None = None,
           workers: int | None = None, recommend: bool = False, sign_as_step: bool = False) -> ExportResult:
    """Export ``model`` to ``target`` (see ``htaf_export.targets.TARGETS``) and, unless told not to, validate it
    (in ``workers`` processes when more than one); ``recommend``: time its ONNX files here and recommend a target.

    ``input_shape`` (per sample, no batch) is needed only when neither ``data`` nor the model file says it.
    ``sign_as_step``: ``torch.sign`` of a computed tensor is a ±1 step (see ``harden``)."""
    chosen = target_named(target)
    if output is not None and not Path(output).is_dir() and not str(output).endswith(("/", "\\")):
        check_suffix(Path(output), chosen)  # said before the model is read, which takes seconds
    options = ExportOptions(portable=portable, snn_mode=snn_mode, lce_kernel=lce_kernel)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = resolve(model if isinstance(model, LoadedModel) else load(model, trust_pickle=trust_pickle),
                     input_shape, data)
    out = output_path(loaded, chosen, output)
    check_writable(out)
    dataset = default_data(loaded.input_shapes, data, loaded.input_names or ("input",)) if validate_artifact else None
    seconds["load"] = time.perf_counter() - start

    t = time.perf_counter()
    hardening = harden(loaded.module, tie=tie, input_shapes=loaded.input_shapes, sign_as_step=sign_as_step)
    seconds["harden"] = time.perf_counter() - t

    t = time.perf_counter()
    hardening, cap, sites = _captured(hardening, loaded, options)
    seconds["capture"] = time.perf_counter() - t

    t = time.perf_counter()
    conversion = convert(cap, chosen, provenance(loaded, chosen, options), options, hardening.model)
    tie_note = unrecorded_tie_note(hardening.sites, tie)
    layout_note = loaded.batch_axes.note(loaded.input_names or ["input"], loaded.input_shapes,
                                         loaded.output_names or []) if loaded.batch_axes is not None else None
    conversion = replace(conversion, notes=(*conversion.notes, *(n for n in (tie_note, layout_note) if n)))
    seconds["convert"] = time.perf_counter() - t

    atomic_write_bytes(out, conversion.data)
    report, recommendation = None, _recommend(cap, chosen, conversion, seconds) if recommend else None
    if dataset is not None:
        t = time.perf_counter()
        try:
            report = validate_file(hardening, read_artifact(out), dataset, str(loaded.path), device, tolerance,
                                   progress=progress, input_shape=loaded.input_shape if not loaded.extra_input_shapes
                                   else loaded.input_shapes, workers=workers,
                                   recipe=recipe_of(loaded, tie, sites, sign_as_step) if (workers or 1) != 1 else None,
                                   graph_steps=_graph_steps(hardening.model, cap))
        except BaseException:  # bad data found while streaming it, an interrupt: no unvalidated file stays behind
            out.unlink(missing_ok=True)
            raise
        seconds["validate"] = time.perf_counter() - t
    return ExportResult(out, chosen.name, hardening, conversion, report, seconds, recommendation)


def _captured(hardening: HardenResult, loaded: LoadedModel, options: ExportOptions
              ) -> tuple[HardenResult, Capture, list[str] | None]:
    """The IR of the hardened model, and its step sites (None when streaming). Hand-written steps are captured
    again from the program whose steps are all Step calls (``record_every_step``)."""
    cap = capture(hardening.model, loaded.input_shapes, loaded.output_names, streaming=options.streaming,
                  input_names=loaded.input_names)
    sites = None if options.streaming else [s.site for s in cap.steps]
    if sites is not None:
        traced = record_every_step(hardening, loaded.input_shapes, sites)
        if traced is not hardening:
            hardening = traced
            cap = capture(hardening.model, loaded.input_shapes, loaded.output_names, input_names=loaded.input_names)
    return hardening, cap, sites


def _recommend(cap: Capture, chosen: Target, conversion: Conversion, seconds: dict[str, float]) -> Recommendation | None:
    if chosen.name == "nir":  # a neuromorphic device, not this CPU, runs the file: CPU timings do not apply
        return None
    t = time.perf_counter()
    found = recommend(cap, {chosen.name: conversion.data})
    seconds["recommend"] = time.perf_counter() - t
    return found


def validate_file(hardening: HardenResult, info: ArtifactInfo, data: Dataset | Batches, model_name: str,
                  device: str = "all", tolerance: Tolerance | None = None, *, progress: Progress | None = None,
                  crafted: bool = True, input_shape: Sequence[int] | None = None, workers: int | None = None,
                  recipe: "ModelRecipe | None" = None, ray: str | None = None,
                  graph_steps: "GraphSteps | None" = None) -> ParityReport:
    """Validate an artifact against a hardened model on every backend this machine has for ``device``;
    with ``workers`` > 1, in that many processes, each rebuilding the model (pickled, else from ``recipe``);
    with ``ray`` (a cluster address), on ``workers`` Ray actors (default: one per CPU of the cluster).
    A TorchScript model records no step: its steps come from its captured graph (``graph_steps``, else captured
    here at the artifact's input shape)."""
    check_artifact_fits(hardening, info, input_shape)
    if graph_steps is None and isinstance(hardening.model, torch.jit.ScriptModule) and not info.streaming:
        graph_steps = _graph_steps(hardening.model, _capture_for_steps(hardening.model, info, input_shape), info.steps)
    runners, skipped = backends_for(info, device, model=hardening.model)
    if not runners:
        why = "; ".join(f"{b}: {r}" for b, r in skipped)
        raise BadInput(f"no runtime on this machine can run {info.path} on device {device!r}" + (f" ({why})" if why else ""))
    if ray is None and (workers or 1) == 1:
        # every runner the artifact's own on the CPU (no PyTorch-on-CUDA check): a long run may move them to a child
        child = worth_overlapping(info.kind) and not info.streaming and all(r.device == "cpu" for r in runners)
        return validate(hardening.model, info, runners, data, model_name, tolerance, crafted=crafted,
                        progress=progress, skipped=skipped, graph_steps=graph_steps,
                        remote=ChildPlan.of(info.path, {s.tensor for s in info.steps}) if child else None)
    from .workers import ModelRecipe, ProcessPool

    recipe = ModelRecipe.of_module(hardening.model, recipe)
    if ray is not None:
        from .distributed import RayPool

        pool: ProcessPool | RayPool = RayPool(recipe, info.path, device, ray, workers)
    else:
        pool = ProcessPool(recipe, info.path, device, workers or 1)
    with pool:
        return validate(hardening.model, info, runners, data, model_name, tolerance, crafted=crafted,
                        progress=progress, skipped=skipped, pool=pool, graph_steps=graph_steps)


def recipe_of(loaded: LoadedModel, tie: str | None, sites: Sequence[str] | None, sign_as_step: bool = False
              ) -> "ModelRecipe":
    """How a worker process rebuilds this hardened model from its file: load, harden with ``tie``, then
    record every step of ``sites`` (None: not traced, as for a streaming SNN), the same steps as here."""
    from .workers import ModelRecipe

    return ModelRecipe(str(loaded.path), loaded.source_format == "pickle", tie,
                       tuple(tuple(int(d) for d in s) for s in loaded.input_shapes),
                       None if sites is None else tuple(sites), batch_axes=loaded.batch_axes,
                       sign_as_step=sign_as_step)


def _graph_steps(model: nn.Module, cap: Capture | None, as_named: Sequence | None = None) -> "GraphSteps | None":
    """The steps of a TorchScript model from its capture (it exposes no intermediate tensors); None otherwise.
    ``as_named``: the artifact's steps, for a capture made again (see ``graph_steps``)."""
    if cap is None or cap.streaming or not isinstance(model, torch.jit.ScriptModule):
        return None
    from .runtimes.onnxruntime import graph_steps

    return graph_steps(cap.model, cap.input_names, cap.steps, as_named)


def _capture_for_steps(model: nn.Module, info: ArtifactInfo, input_shape) -> Capture | None:
    shape = input_shape if input_shape is not None else json.loads(info.metadata.get(md.INPUT_SHAPE, "null"))
    if shape is None:
        return None
    try:
        return capture(model, shape, info.output_names, input_names=info.input_names)
    except (BadInput, UnsupportedLayer):  # the outputs are still compared; the steps then go unobserved
        return None


def check_artifact_fits(hardening: HardenResult, info: ArtifactInfo, model_shape: Sequence[int] | None) -> None:
    """Refuse (exit 2) an artifact that was not exported from this model: other input shape or other steps."""
    shape = info.metadata.get(md.INPUT_SHAPE)
    if shape and model_shape is not None:
        try:
            artifact_shape = json.loads(shape)
        except ValueError:
            artifact_shape = None
        if artifact_shape is not None and artifact_shape != json.loads(json.dumps(list(model_shape))):
            raise BadInput(f"artifact {info.path} takes input {artifact_shape}, the model takes {list(model_shape)}: "
                           f"it was not exported from this model")
    sites = set(step_modules(hardening.model))
    if sites:
        missing = sorted({s.site for s in info.steps} - sites)
        if missing:
            raise BadInput(f"artifact {info.path} has step sites the model lacks ({', '.join(missing[:4])}): "
                           f"it was not exported from this model")
