"""The parity report: what validation found, per backend and tensor, in bounded memory.

Read by the console, JSON and HTML renderers; the rules that fill it are in ``validate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

EXAMPLES = 3
RATIO_FLOOR_S = 0.1  # below this much runtime inference, validation time is not given as a ratio to it
# |u| histogram: bin 0 counts exact zeros; then (0, 1e-9], (1e-9, 1e-8], …, (1e2, 1e3], (1e3, ∞).
MARGIN_EDGES: list[float] = [0.0] + [10.0**e for e in range(-9, 4)] + [float("inf")]


@dataclass
class Tolerance:
    """``derived`` (the default): each element's tolerance is twice its rounding bound (``bounds``); the fixed
    ``atol`` / ``rtol`` / ``flip_margin`` apply when the user sets one of them, or when no bound exists."""

    atol: float = 1e-5
    rtol: float = 1e-5
    flip_margin: float = 1e-4
    derived: bool = True


@dataclass
class Example:
    """One mismatch, kept so a person can look at it."""

    inputs: str  # "data" or "crafted"
    sample: int
    unit: int
    reference: float
    artifact: float
    pre: float | None = None
    certified_tie: bool = False


@dataclass
class TensorResult:
    """Agreement of one tensor on one backend, accumulated over all batches."""

    name: str
    kind: str  # "binary" or "float"
    site: str | None = None
    layer: str | None = None  # the layer that feeds it, where the artifact says
    observed: bool = True  # False when the reference cannot record this step (traced models)
    elements: int = 0
    mismatched: int = 0
    explained: int = 0
    tie_violations: int = 0
    excused_samples: int = 0
    max_abs_error: float = 0.0
    min_margin: float | None = None  # smallest |pre-activation| seen at this step (how close to a tie)
    exact_ties: int = 0  # units with u == 0 exactly in the reference
    tie_flips: int = 0  # of those, how many the artifact flipped
    certified_ties: int = 0
    examples: list[Example] = field(default_factory=list)

    @property
    def unexplained(self) -> int:
        return self.mismatched - self.explained

    @property
    def passed(self) -> bool:
        return self.unexplained == 0

    @property
    def agreement(self) -> float:
        return 1.0 - self.mismatched / self.elements if self.elements else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(unexplained=self.unexplained, passed=self.passed, agreement=self.agreement)
        return d

    def absorb(self, other: "TensorResult") -> None:
        """Add another shard's counts of the same tensor (shards see disjoint samples)."""
        for name in _TENSOR_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.observed = self.observed and other.observed
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        margins = [m for m in (self.min_margin, other.min_margin) if m is not None]
        self.min_margin = min(margins) if margins else None
        # the first examples in input order, whichever shard saw them
        self.examples = sorted(self.examples + other.examples, key=lambda e: (e.inputs != "data", e.sample))[:EXAMPLES]


_TENSOR_COUNTS = ("elements", "mismatched", "explained", "tie_violations", "excused_samples", "exact_ties",
                  "tie_flips", "certified_ties")


@dataclass
class Argmax:
    """Argmax agreement of the first output over one kind of input (the data, or the crafted inputs)."""

    samples: int = 0
    agree: int = 0
    explained: int = 0  # disagreements on excused samples or reference ties between classes

    @property
    def passed(self) -> bool:
        return self.agree + self.explained >= self.samples

    def add(self, n: int, agree: int, explained: int) -> None:
        self.samples, self.agree, self.explained = self.samples + n, self.agree + agree, self.explained + explained

    def absorb(self, other: "Argmax") -> None:
        self.add(other.samples, other.agree, other.explained)


@dataclass
class BackendResult:
    backend: str
    device: str
    tensors: list[TensorResult] = field(default_factory=list)
    data: Argmax = field(default_factory=Argmax)
    crafted: Argmax = field(default_factory=Argmax)
    reference_correct: int = 0
    artifact_correct: int = 0
    labelled: int = 0
    seconds: float = 0.0  # running the backend, decoding included
    inference_seconds: float = 0.0  # inside the runtime's own inference calls only

    @property
    def samples(self) -> int:
        """Data samples compared (crafted inputs not counted)."""
        return self.data.samples

    @property
    def argmax_passed(self) -> bool:
        return self.data.passed and self.crafted.passed

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors) and self.argmax_passed

    @property
    def first_failure(self) -> str | None:
        failing = next((t.name for t in self.tensors if not t.passed), None)
        if failing is None and not self.argmax_passed:
            first_float = next((t.name for t in self.tensors if t.kind == "float"), "output")
            return f"argmax of {first_float}"
        return failing

    def tensor(self, name: str) -> TensorResult | None:
        return next((t for t in self.tensors if t.name == name), None)

    def absorb(self, other: "BackendResult") -> None:
        """Add another shard's result for the same backend (seconds add up: CPU time, not wall time)."""
        for mine, theirs in zip(self.tensors, other.tensors, strict=True):
            mine.absorb(theirs)
        self.data.absorb(other.data)
        self.crafted.absorb(other.crafted)
        self.reference_correct += other.reference_correct
        self.artifact_correct += other.artifact_correct
        self.labelled += other.labelled
        self.seconds += other.seconds
        self.inference_seconds += other.inference_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "device": self.device, "passed": self.passed,
            "first_failure": self.first_failure, "samples": self.data.samples,
            "crafted_samples": self.crafted.samples,
            "argmax_agreement": self.data.agree / self.data.samples if self.data.samples else None,
            "argmax_explained": self.data.explained,
            "crafted_argmax_agreement": self.crafted.agree / self.crafted.samples if self.crafted.samples else None,
            "reference_accuracy": self.reference_correct / self.labelled if self.labelled else None,
            "artifact_accuracy": self.artifact_correct / self.labelled if self.labelled else None,
            "labelled": self.labelled, "seconds": round(self.seconds, 3),
            "inference_seconds": round(self.inference_seconds, 3),
            "tensors": [t.to_dict() for t in self.tensors],
        }


def _edges_for(dtype: np.dtype) -> list[np.floating]:
    """The finite edges in ``dtype``, each rounded down, so that ``a <= edge`` there means a ≤ the exact edge."""
    out = []
    for edge in MARGIN_EDGES[:-1]:
        e = np.asarray(edge, dtype=dtype if np.issubdtype(dtype, np.floating) else np.float64)
        if float(e) > edge:
            e = np.nextafter(e, e.dtype.type(-np.inf))
        out.append(e)
    return out


@dataclass
class MarginHistogram:
    """Counts of |u| for one step tensor in fixed bins (bounded memory): ``counts[0]`` exactly 0, then
    ``counts[i]`` for ``MARGIN_EDGES[i-1] < |u| ≤ MARGIN_EDGES[i]``, the last one above 1e3."""

    tensor: str
    counts: list[int] = field(default_factory=lambda: [0] * len(MARGIN_EDGES))

    def add(self, pre: np.ndarray) -> None:
        # One counting pass per edge beats a binary search per element by ~5x on large step tensors.
        a = np.abs(pre.reshape(-1))
        below = [int(np.count_nonzero(a <= edge)) for edge in _edges_for(a.dtype)]  # a ≤ 0, a ≤ 1e-9, … a ≤ 1e3
        below.append(a.size)
        counts = [below[0]] + [hi - lo for lo, hi in zip(below, below[1:])]
        self.counts = [c + b for c, b in zip(self.counts, counts)]

    def to_dict(self) -> dict[str, Any]:
        return {"edges": MARGIN_EDGES, "counts": self.counts}

    def absorb(self, other: "MarginHistogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]


@dataclass
class ParityReport:
    model: str
    artifact: str
    inputs: str
    tolerance: Tolerance
    backends: list[BackendResult] = field(default_factory=list)
    crafted: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    margins: dict[str, MarginHistogram] = field(default_factory=dict)
    tie_rule: dict[str, str | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tie_rule_consistent(self) -> bool:
        declared, artifact = self.tie_rule.get("reference"), self.tie_rule.get("artifact")
        return declared is None or artifact is None or declared == artifact

    @property
    def passed(self) -> bool:
        return bool(self.backends) and all(b.passed for b in self.backends) and self.tie_rule_consistent

    @property
    def first_failure(self) -> tuple[str, str] | None:
        """(backend, tensor) of the first failure, tensors before argmax, backends in order."""
        for b in self.backends:
            name = next((t.name for t in b.tensors if not t.passed), None)
            if name:
                return b.backend, name
        for b in self.backends:
            if not b.passed:
                return b.backend, b.first_failure or "argmax"
        if not self.tie_rule_consistent:
            return "metadata", "tie rule"
        return None

    def failure(self) -> dict[str, Any] | None:
        """The first failure with the layer and a sentence saying what went wrong."""
        first = self.first_failure
        if first is None:
            return None
        backend, name = first
        if backend == "metadata":
            return {"backend": None, "tensor": None, "layer": None,
                    "reason": f"the artifact declares tie rule {self.tie_rule.get('artifact')!r} but the model "
                              f"declares {self.tie_rule.get('reference')!r}"}
        b = next(x for x in self.backends if x.backend == backend)
        t = b.tensor(name)
        if t is None:
            reason = (f"argmax disagrees on {b.data.samples - b.data.agree - b.data.explained} data and "
                      f"{b.crafted.samples - b.crafted.agree - b.crafted.explained} crafted samples")
            return {"backend": backend, "tensor": name, "layer": None, "reason": reason}
        if t.kind == "binary":
            reason = f"{t.unexplained:,} unexplained flip{'s' if t.unexplained != 1 else ''} of {t.elements:,} bits"
            if t.tie_violations:
                reason += (f", {t.tie_violations} of them on certified ties (u = 0 exactly): the tie rule or the "
                           f"threshold differs from the model's")
        else:
            reason = f"{t.mismatched:,} of {t.elements:,} values beyond tolerance (max error {t.max_abs_error:.3g})"
        return {"backend": backend, "tensor": name, "layer": t.layer, "reason": reason}

    def failure_line(self) -> str | None:
        f = self.failure()
        if f is None:
            return None
        if f["tensor"] is None:
            return f"parity FAILED: {f['reason']}"
        layer = f" (fed by layer {f['layer']})" if f.get("layer") else ""
        return f"parity FAILED on {f['backend']}: first failing tensor {f['tensor']}{layer}: {f['reason']}"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "htaf-export/parity-report", "version": 1, "model": self.model, "artifact": self.artifact,
                "passed": self.passed, "first_failure": self.failure(), "inputs": self.inputs,
                "crafted": self.crafted, "tolerance": asdict(self.tolerance), "tie_rule": self.tie_rule,
                "backends": [b.to_dict() for b in self.backends], "skipped": self.skipped,
                "margins": {k: v.to_dict() for k, v in self.margins.items()}, "notes": self.notes,
                "seconds": round(self.seconds, 3)}


def uncompared_outputs(backends: list[Any]) -> str | None:
    """A note for float outputs none of whose values was compared on some backend: every sample was excused by
    an explained flip before them (the pass says nothing about those outputs, and must not pass silently)."""
    names = sorted({t.name for b in backends for t in b.tensors if t.kind == "float" and t.elements == 0
                    and t.excused_samples > 0})
    if not names:
        return None
    return (f"no value of output{'s' if len(names) > 1 else ''} {', '.join(names)} was compared: every sample was "
            f"excused by an explained flip before it")
