"""Validation: run the hardened reference and the artifact on the same inputs and compare tensor by tensor.

Parity rules (DESIGN.md): binary tensors are compared exactly. A flipped bit is *explained* when the
reference pre-activation lies within ``flip_margin`` of its threshold; everything downstream of an
explained flip in that sample is excused too (it follows from the flip). Any other flip fails. Float
tensors use atol/rtol plus argmax agreement. The report names the first failing tensor in graph order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .capture import StepNode
from .data import Dataset
from .reference import ReferenceRun, run_reference
from .runtimes import ArtifactInfo, Runner


@dataclass
class Tolerance:
    atol: float = 1e-5
    rtol: float = 1e-5
    flip_margin: float = 1e-4


@dataclass
class TensorResult:
    """Agreement of one tensor on one backend, accumulated over all batches."""

    name: str
    kind: str  # "binary" or "float"
    site: str | None = None
    elements: int = 0
    mismatched: int = 0
    explained: int = 0
    excused_samples: int = 0
    max_abs_error: float = 0.0
    min_margin: float | None = None  # smallest |pre-activation| seen at this step (how close to a tie)

    @property
    def unexplained(self) -> int:
        return self.mismatched - self.explained

    @property
    def passed(self) -> bool:
        return self.unexplained == 0


@dataclass
class BackendResult:
    backend: str
    device: str
    tensors: list[TensorResult] = field(default_factory=list)
    samples: int = 0
    argmax_agree: int = 0
    reference_correct: int = 0
    artifact_correct: int = 0
    labelled: int = 0

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors) and self.argmax_agree + self._excused_argmax >= self.samples

    _excused_argmax: int = 0

    @property
    def first_failure(self) -> str | None:
        return next((t.name for t in self.tensors if not t.passed), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "device": self.device, "passed": self.passed, "samples": self.samples,
            "first_failure": self.first_failure,
            "argmax_agreement": self.argmax_agree / max(self.samples, 1),
            "reference_accuracy": self.reference_correct / self.labelled if self.labelled else None,
            "artifact_accuracy": self.artifact_correct / self.labelled if self.labelled else None,
            "tensors": [{**asdict(t), "unexplained": t.unexplained, "passed": t.passed} for t in self.tensors],
        }


@dataclass
class ParityReport:
    model: str
    artifact: str
    inputs: str
    tolerance: Tolerance
    backends: list[BackendResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.backends) and all(b.passed for b in self.backends)

    @property
    def first_failure(self) -> tuple[str, str] | None:
        for b in self.backends:
            if b.first_failure:
                return b.backend, b.first_failure
        for b in self.backends:
            if not b.passed:
                return b.backend, "argmax of " + (b.tensors[-1].name if b.tensors else "output")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "htaf-export/parity-report", "version": 1, "model": self.model, "artifact": self.artifact,
                "inputs": self.inputs, "tolerance": asdict(self.tolerance), "passed": self.passed,
                "first_failure": self.first_failure, "backends": [b.to_dict() for b in self.backends]}


def _compare_binary(result: TensorResult, ref: np.ndarray, got: np.ndarray, pre: np.ndarray | None,
                    excused: np.ndarray, tol: Tolerance) -> None:
    n = len(ref)
    ref2, got2 = ref.reshape(n, -1), got.reshape(n, -1)
    active = ~excused
    result.excused_samples += int(excused.sum())
    result.elements += int(ref2[active].size)
    flips = (ref2 != got2) & active[:, None]
    count = int(flips.sum())
    result.mismatched += count
    if pre is not None:
        pre2 = np.abs(pre.reshape(n, -1))
        margin = float(pre2[active].min()) if active.any() else None
        if margin is not None:
            result.min_margin = margin if result.min_margin is None else min(result.min_margin, margin)
        if count:
            close = flips & (pre2 <= tol.flip_margin)
            result.explained += int(close.sum())
            # A sample whose every flip is explained carries on excused: what follows depends on the flip.
            explained_samples = close.any(axis=1) & ~(flips & ~close).any(axis=1)
            excused |= explained_samples


def _compare_float(result: TensorResult, ref: np.ndarray, got: np.ndarray, excused: np.ndarray,
                   tol: Tolerance) -> None:
    n = len(ref)
    active = ~excused
    result.excused_samples += int(excused.sum())
    ref2, got2 = ref.reshape(n, -1)[active], got.reshape(n, -1)[active]
    result.elements += int(ref2.size)
    if ref2.size:
        err = np.abs(ref2.astype(np.float64) - got2.astype(np.float64))
        result.max_abs_error = max(result.max_abs_error, float(err.max()))
        result.mismatched += int((err > tol.atol + tol.rtol * np.abs(ref2)).sum())


def _batches(x: np.ndarray, size: int) -> Iterator[slice]:
    for i in range(0, len(x), size):
        yield slice(i, min(i + size, len(x)))


def _ordered_tensors(info: ArtifactInfo) -> list[TensorResult]:
    steps = [TensorResult(s.tensor, "binary", s.site) for s in info.steps]
    step_names = {s.tensor for s in info.steps}
    outputs = [TensorResult(o, "float") for o in info.output_names if o not in step_names]
    return steps + outputs


def _validate_backend(model: nn.Module, info: ArtifactInfo, runner: Runner, data: Dataset,
                      tol: Tolerance, batch_size: int, reference_device: str) -> BackendResult:
    result = BackendResult(runner.name, runner.device, _ordered_tensors(info))
    step_of = {s.tensor: s for s in info.steps}
    output_names = info.output_names
    steps_per_run = 1 if not info.streaming else int(getattr(model, "steps", 1))
    for sl in _batches(data.x, batch_size):
        x = data.x[sl]
        n = len(x)
        excused = np.zeros(n, dtype=bool)
        state = [v.numpy() for v in model.initial_state(n)] if info.streaming else []
        for _ in range(steps_per_run):
            inputs = (torch.from_numpy(x), *(torch.from_numpy(v) for v in state))
            ref = run_reference(model, inputs, output_names, reference_device, streaming=info.streaming)
            art = runner.run(dict(zip(info.input_names, [x, *state])))
            for t in result.tensors:
                if t.kind == "binary":
                    s: StepNode = step_of[t.name]
                    _compare_binary(t, ref.steps[(s.site, s.call)], art[t.name],
                                    ref.preactivations.get((s.site, s.call)), excused, tol)
                else:
                    _compare_float(t, ref.outputs[t.name], art[t.name], excused, tol)
            # Streaming is checked one step at a time from the reference state, so errors do not compound.
            state = [ref.outputs[name] for name in output_names[1:]] if info.streaming else []
        first = output_names[0]
        agree = ref.outputs[first].reshape(n, -1).argmax(1) == art[first].reshape(n, -1).argmax(1)
        result.samples += n
        result.argmax_agree += int(agree.sum())
        result._excused_argmax += int((~agree & excused).sum())
        if data.y is not None:
            y = data.y[sl]
            result.labelled += n
            result.reference_correct += int((ref.outputs[first].reshape(n, -1).argmax(1) == y).sum())
            result.artifact_correct += int((art[first].reshape(n, -1).argmax(1) == y).sum())
    return result


def validate(model: nn.Module, info: ArtifactInfo, runners: list[Runner], data: Dataset,
             model_name: str = "", tolerance: Tolerance | None = None,
             batch_size: int = 256, reference_device: str = "cpu") -> ParityReport:
    """Compare ``model`` (hardened) with the artifact on every runner; inputs in batches of ``batch_size``."""
    tol = tolerance or Tolerance()
    report = ParityReport(model_name, str(info.path), data.source, tol)
    for runner in runners:
        report.backends.append(_validate_backend(model, info, runner, data, tol, batch_size, reference_device))
    return report
