"""Validation: run the hardened reference and the artifact on the same inputs and compare tensor by tensor.

Inputs
------
The data (the user's ``--data``, else the bundled digits for sample models, else inputs generated from
the input spec) plus the *crafted* inputs of ``htaf_export.crafted``, which put pre-activations exactly
on and one float step beside thresholds. Both are read in batches; see "Memory" below.

Parity rules (DESIGN.md), as applied here
------------------------------------------
Let u be the reference pre-activation of a unit (its step input minus θ, float32, CPU).

- **Binary tensors** (step outputs) are compared exactly. A unit whose bit differs is a *flip*.

  1. A flip on a **certified tie** is never explained. A certified tie is a crafted input on which
     u = 0 exactly *and* every float32 implementation computes u = 0 exactly (one product plus a bias,
     rounding to θ whichever way it is evaluated; see ``htaf_export.crafted``). There the declared
     tie rule alone decides the bit, so a flip means the artifact applies the other rule, or moved
     the threshold. These flips are counted as ``tie_violations``.
  2. Otherwise a flip is **explained** when |u| ≤ ``flip_margin``: the reference sits within float
     rounding of the threshold, where an artifact that computes the same real numbers in another
     order (batch norm folded into the threshold, another summation order, FMA) may legitimately land
     on the other side. This includes exact ties that are not certified (u = 0 in the reference's
     arithmetic only): they are counted (``exact_ties``, ``tie_flips``) but follow this rule.
  3. Every other flip is **unexplained** and fails the tensor.

  A sample whose flips at a tensor are all explained is *excused* for every later tensor (what
  follows depends on the flip); a sample with an unexplained flip is not, so the damage shows
  downstream too, but the report names the first failing tensor. A step the file keeps in no tensor (fused into a
  kernel) cannot be seen to flip: a sample whose pre-activation there lies within the margin (> 0; an exact sum
  has none) is spared the output comparison likewise, and the report counts such samples.
- **Float tensors** (logits, membrane state) pass when |ref − artifact| ≤ atol + rtol·|ref|.
- **Argmax** of the first output must agree, except on excused samples and where the reference's two
  largest values are within atol + rtol·|max| of each other (a tie between classes).
- **Accuracy** of reference and artifact is reported when the data has labels (crafted inputs have none).
- The **first failure** is the first failing tensor in graph order (step tensors in the artifact's
  graph order, then the outputs), on the first backend where one fails.
- **Declared tie rule**: when the artifact records its tie rule (metadata ``htaf_export.tie``) and it
  differs from the reference's, the check fails even if no input reaches an exact tie.

Memory
------
Data is read and compared one batch at a time (``batch_size`` samples, a .npz is streamed from its
archive). What accumulates is bounded: counters per tensor and backend, at most ``EXAMPLES`` example
flips per tensor, and one fixed-size histogram of |u| per step tensor (``MARGIN_EDGES``), so memory
does not grow with the number of samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .compare import (BatchBounds, argmax_explained, classes, compare_binary, compare_float, near_hidden_steps,
                      ordered_tensors)
from .crafted import CraftedSet
from .data import Batches, Dataset, Inputs, as_batches, count
from .errors import BadInput
from .nn.modules import step_modules
from .parts import crafted_inputs, validation_parts
from . import outputs
from .outputs import require_batch_first
from .references import Chunk, References, rows
from .validation_notes import finish
from .parity import BackendResult, MarginHistogram, ParityReport, Tolerance
from .runtimes import ArtifactInfo, Runner


def _declared_tie(model: nn.Module) -> str | None:
    ties = {m.tie for m in step_modules(model).values()}
    return ties.pop() if len(ties) == 1 else None


Part = tuple[str, Inputs, "np.ndarray | None", int]  # ("data" or "crafted", inputs, labels, offset of the first)


@dataclass
class Shard:
    """What one worker's share of the inputs adds to the report (``Validation.absorb`` merges it)."""

    backends: list[BackendResult]
    margins: dict[str, MarginHistogram]
    unobserved: set[str]
    ties: set[str]
    no_bound: str
    needed_bounds: bool
    foreign_labels: str = ""  # why no accuracy: labels beyond the model's classes
    unsure: int = 0  # samples whose outputs were not compared (``ReferenceRun.unsure``)
    hidden: dict[str, int] = field(default_factory=dict)  # by backend: spared by a step no tensor holds
    scored: str | None = None  # the output argmax and accuracy were scored on


@dataclass(frozen=True)
class ShardSetup:
    """What every worker needs besides the model and the artifact, which it rebuilds itself."""

    tolerance: Tolerance
    reference_device: str
    crafted: CraftedSet | None
    graph_steps: object = None  # runtimes.onnxruntime.GraphSteps, for a reference that records no step


class ShardPool(Protocol):
    """Runs ``Validation.batch`` on the parts in worker processes (or machines); one Shard per worker.
    ``advance(samples)`` is called as batches finish."""

    workers: int

    def run(self, setup: ShardSetup, parts: Iterator[Part], advance: Callable[[int], None]) -> list[Shard]: ...


class Validation:
    """One pass over the inputs: the reference runs once per batch, then every backend on the same batch."""

    def __init__(self, model: nn.Module, info: ArtifactInfo, runners: Sequence[Runner], tol: Tolerance,
                 reference_device: str, crafted: CraftedSet | None, graph_steps=None) -> None:
        self.model, self.info, self.runners, self.tol = model, info, list(runners), tol
        self.graph_steps = graph_steps
        self.references = References(model, info, tol, reference_device, graph_steps)
        self.foreign_labels = ""
        self.scored: str | None = None  # the output argmax agreement and accuracy are scored on
        self.results = [BackendResult(r.name, r.device, ordered_tensors(info)) for r in self.runners]
        self.step_of = {s.tensor: s for s in info.steps}
        self.margins = {s.tensor: MarginHistogram(s.tensor) for s in info.steps}
        self.unobserved: set[str] = set()
        self.unsure = 0
        self.hidden: dict[str, int] = {}
        self.ties: set[str] = set()
        self.steps_per_run = int(getattr(model, "steps", 1)) if info.streaming else 1
        # Certified ties by (tensor, time step) → list of (crafted row, unit).
        self.certified: dict[tuple[str, int], list[tuple[int, int]]] = {}
        if crafted is not None:
            for p in crafted.certified():
                for s in info.steps:
                    if s.site != p.site:
                        continue
                    if info.streaming:
                        self.certified.setdefault((s.tensor, p.call), []).append((p.sample, p.unit))
                    elif s.call == p.call:
                        self.certified.setdefault((s.tensor, 0), []).append((p.sample, p.unit))

    def shard(self) -> Shard:
        refs = self.references
        return Shard(self.results, self.margins, self.unobserved, self.ties, refs.no_bound, refs.needed_bounds,
                     self.foreign_labels, self.unsure, self.hidden, self.scored)

    def absorb(self, shard: Shard) -> None:
        # by name: a worker on another machine may see other runtimes (a Ray actor is given no GPU)
        theirs = {b.backend: b for b in shard.backends}
        if set(theirs) != {b.backend for b in self.results}:
            raise BadInput(f"a worker has backends {sorted(theirs)}, this machine "
                           f"{sorted(b.backend for b in self.results)}: choose a --device every worker has")
        for mine in self.results:
            mine.absorb(theirs[mine.backend])
        for name, histogram in shard.margins.items():
            self.margins[name].absorb(histogram)
        self.unobserved |= shard.unobserved
        self.ties |= shard.ties
        refs = self.references
        refs.no_bound = refs.no_bound or shard.no_bound
        refs.needed_bounds = refs.needed_bounds or shard.needed_bounds
        self.foreign_labels = self.foreign_labels or shard.foreign_labels
        self.scored = self.scored or shard.scored
        self.unsure += shard.unsure
        for backend, spared in shard.hidden.items():
            self.hidden[backend] = self.hidden.get(backend, 0) + spared

    def _certified_mask(self, tensor: str, t: int, offset: int, n: int, units: int) -> np.ndarray | None:
        marks = self.certified.get((tensor, t))
        if not marks:
            return None
        mask = np.zeros((n, units), bool)
        for row, unit in marks:
            if offset <= row < offset + n and unit < units:
                mask[row - offset, unit] = True
        return mask

    def batch(self, x: Inputs, y: np.ndarray | None, part: str, offset: int) -> None:
        """Compare every backend with the reference on one batch (every time step, for a streaming SNN)."""
        xs = list(x) if isinstance(x, tuple) else [x]
        n = len(xs[0])
        info = self.info
        excused = [np.zeros(n, dtype=bool) for _ in self.runners]
        state = [v.numpy() for v in self.model.initial_state(n)] if info.streaming else []
        for t in range(self.steps_per_run):
            inputs = (*(torch.from_numpy(np.ascontiguousarray(a)) for a in xs), *(torch.from_numpy(v) for v in state))
            feed = dict(zip(info.input_names, [*xs, *state]))
            arts = []
            for runner, result in zip(self.runners, self.results):
                started, inside = time.perf_counter(), runner.inference_seconds
                arts.append(runner.run(feed))
                result.seconds += time.perf_counter() - started
                result.inference_seconds += runner.inference_seconds - inside
            # chunk by chunk: each chunk's reference is compared and dropped before the next one is computed
            for chunk in self.references.chunks(inputs, self._note):
                self._chunk(inputs, chunk, arts, excused, y, part, offset, t, n,
                            argmax=t == self.steps_per_run - 1)
            # Streaming is checked one step at a time from the reference state, so errors do not compound.
            state = [chunk[2].outputs[name] for name in info.output_names[1:]] if info.streaming else []

    def feed(self, x: Inputs) -> dict[str, np.ndarray]:
        """What the runtimes are given for a batch (not streaming)."""
        return dict(zip(self.info.input_names, list(x) if isinstance(x, tuple) else [x]))

    def reference_of(self, x: Inputs) -> tuple[tuple[torch.Tensor, ...], list[Chunk]]:
        """The first half of ``batch`` when another process runs the runtimes: (inputs, reference chunks)."""
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (list(x) if isinstance(x, tuple) else [x]))
        return inputs, list(self.references.chunks(inputs, self._note))

    def compare_with(self, inputs: tuple[torch.Tensor, ...], refs: list[Chunk],
                     answers: Sequence[tuple[dict[str, np.ndarray], Any]], y: np.ndarray | None, part: str,
                     offset: int) -> None:
        """The second half: the runtimes' tensors and times (``overlap.RunnerTimes``) against the reference."""
        n = int(inputs[0].shape[0])
        for result, (_, times) in zip(self.results, answers):
            result.seconds += times.seconds
            result.inference_seconds += times.inference_seconds
        arts = [tensors for tensors, _ in answers]
        excused = [np.zeros(n, dtype=bool) for _ in self.runners]
        for chunk in refs:
            self._chunk(inputs, chunk, arts, excused, y, part, offset, 0, n, argmax=True)

    def _chunk(self, inputs: tuple[torch.Tensor, ...], chunk: Chunk, arts: list[dict[str, np.ndarray]],
               excused: list[np.ndarray], y: np.ndarray | None, part: str, offset: int, t: int, n: int,
               argmax: bool) -> None:
        """Rows [start, stop) of a batch of n: the tensors, then (at the last time step) the argmax."""
        start, stop, ref, found = chunk
        require_batch_first([v.shape for v in ref.outputs.values()], stop - start, list(ref.outputs))
        mine = [rows(a, start, stop, n) for a in arts]
        theirs = [e[start:stop] for e in excused]  # views: what the comparison excuses, the batch excuses
        self._compare(rows(inputs, start, stop, n), ref, mine, theirs, part, offset + start, t, stop - start, found)
        if argmax:
            self._argmax(ref, mine, theirs, y[start:stop] if y is not None and len(y) == n else y, part, stop - start)

    def _note(self, ref) -> None:
        """What the report keeps of a reference run: the tie rules applied, the margins' histogram."""
        self.ties |= ref.ties
        if ref.unsure is not None:
            self.unsure += int(ref.unsure.sum())
        for s in self.info.steps:
            pre = ref.preactivations.get((s.site, s.call))
            if pre is not None:
                self.margins[s.tensor].add(pre)

    def _compare(self, inputs: tuple[torch.Tensor, ...], ref, arts: list[dict[str, np.ndarray]],
                 excused: list[np.ndarray], part: str, offset: int, t: int, n: int,
                 found: BatchBounds | None = None) -> None:
        if found is None:
            found = self.references.bounds_for(inputs, ref, arts, n)
        for i, (runner, result) in enumerate(zip(self.runners, self.results)):
            self._tensors(runner.name, result, ref, arts[i], excused[i], part, offset, t, n, found)

    def _tensors(self, backend: str, result: BackendResult, ref, art: dict[str, np.ndarray], excused: np.ndarray,
                 part: str, offset: int, t: int, n: int, found: BatchBounds | None) -> None:
        """Each step tensor (bit for bit) and each float output of one backend, against the reference."""
        # with derived tolerances and no sample needing bounds, every output agrees to its last bits: none to spare
        hidden = near_hidden_steps(ref, {(s.site, s.call) for s in self.info.steps if s.tensor in art}, found,
                                   self.tol.flip_margin, n) \
            if found is not None or not self.tol.derived or self.references.no_bound else np.zeros(n, bool)
        self.hidden[backend] = self.hidden.get(backend, 0) + int(hidden.sum())
        for tr in result.tensors:
            key = None
            if tr.kind == "binary":
                s = self.step_of[tr.name]
                key = (s.site, s.call)
                if key not in ref.steps:
                    tr.observed = False
                    self.unobserved.add(tr.name)
                    continue
            if tr.name not in art:
                raise BadInput(f"backend {backend} gives no tensor {tr.name!r}")
            if key is not None:
                pre = ref.preactivations[key]
                cert = self._certified_mask(tr.name, t, offset, n, int(pre[0].size)) if part == "crafted" else None
                # a flipped bit may be this far from its threshold and still be rounding: twice the step
                # input's bound (derived tolerances), else the fixed flip margin
                margin = found.step_margin(key) if found is not None else None
                if margin is None:
                    margin = self.tol.flip_margin
                compare_binary(tr, ref.steps[key], art[tr.name], pre, cert, excused, margin, part, offset)
            else:
                bound = found.outputs.get(tr.name) if found is not None else None
                compare_float(tr, ref.outputs[tr.name], art[tr.name], _spared(excused | hidden, ref), self.tol, part,
                              offset, bound)
        excused |= hidden  # and the argmax

    def _argmax(self, ref, arts: list[dict[str, np.ndarray]], excused: list[np.ndarray], y: np.ndarray | None,
                part: str, n: int) -> None:
        """Argmax agreement of the first output on every backend, and accuracy where there are labels; an output
        of one integer a sample is a class index already (an argmax in the model's forward)."""
        if self.scored is None:  # decided once, on the first batch: the logits, not a bottleneck's concepts
            names = self.info.output_names
            self.scored = names[outputs.scored([ref.outputs[name] for name in names])]
        first = self.scored
        ref_logits = ref.outputs[first].reshape(n, -1)
        indices = ref_logits.shape[1] == 1 and np.issubdtype(ref_logits.dtype, np.integer)
        tie_between_classes = np.zeros(n, bool) if indices else argmax_explained(ref_logits, self.tol)
        ref_class = classes(ref_logits, indices)
        for i, result in enumerate(self.results):
            got = classes(np.asarray(arts[i][first]).reshape(n, -1), indices)
            agree = ref_class == got
            explained = int((~agree & (_spared(excused[i], ref) | tie_between_classes)).sum())
            if part == "crafted":
                result.crafted.add(n, int(agree.sum()), explained)
                continue
            result.data.add(n, int(agree.sum()), explained)
            if y is not None and len(y) and ref.outputs[first].ndim > 2:  # a map out (segmentation, an image)
                self.foreign_labels = f"output {first!r} is not a vector of class scores: no accuracy is reported"
            elif y is not None and len(y) and not indices and int(y.max()) >= ref_logits.shape[1]:
                self.foreign_labels = (f"the labels go up to {int(y.max())}, but output {first!r} has "
                                       f"{ref_logits.shape[1]} values: no accuracy is reported")
            elif y is not None and len(y):  # labels that name its classes
                result.labelled += n
                result.reference_correct += int((ref_class == y).sum())
                result.artifact_correct += int((got == y).sum())


def validate(model: nn.Module, info: ArtifactInfo, runners: list[Runner], data: Dataset | Batches,
             model_name: str = "", tolerance: Tolerance | None = None, batch_size: int = 256,
             reference_device: str = "cpu", *, crafted: CraftedSet | bool = True,
             progress: Callable[[int, int], None] | None = None,
             skipped: Sequence[tuple[str, str]] = (), pool: ShardPool | None = None, graph_steps=None,
             remote=None) -> ParityReport:
    """Compare ``model`` (hardened) with the artifact on every runner; inputs in batches of ``batch_size``.

    ``crafted``: True builds the crafted threshold inputs from the model (see ``htaf_export.crafted``),
    a ``CraftedSet`` uses that one, False leaves them out. ``progress(done, total)`` is called after
    each batch with sample counts. ``skipped`` lists (backend, reason) for backends not run. ``pool``
    (``htaf_export.workers``) spreads the batches over worker processes; the report is the same.
    ``graph_steps``: the steps of a model that records none (TorchScript), from its captured graph. ``remote``
    (``overlap.ChildPlan``): a long validation moves the runtimes to a child process, overlapping the references.
    """
    started = time.perf_counter()
    tol = tolerance or Tolerance()
    batches = as_batches(data)
    report = _new_report(model, info, model_name, batches, tol, skipped)
    crafted_set = crafted_inputs(model, batches, crafted, report.notes)
    # none made (several inputs, --no-crafted): the same fields, zero, as the schema has them
    report.crafted = (crafted_set or CraftedSet(np.zeros(0, np.float32))).to_dict()
    run = Validation(model, info, runners, tol, reference_device, crafted_set, graph_steps)
    total = len(batches) + (len(crafted_set) if crafted_set is not None else 0)
    parts = validation_parts(batches, crafted_set, _batch_size(batch_size, total, pool, remote))  # streamed
    done = [0]

    def advance(samples: int) -> None:
        done[0] += samples
        if progress:
            progress(done[0], total)

    advance(0)
    if pool is not None:
        for shard in pool.run(ShardSetup(tol, reference_device, crafted_set, graph_steps), parts, advance):
            run.absorb(shard)
    elif remote is not None and not info.streaming:
        from .overlap import with_child

        with_child(run, remote, parts, advance, total)
    else:
        for part, x, y, offset in parts:
            run.batch(x, y, part, offset)
            advance(count(x))
    finish(report, run)
    report.seconds = time.perf_counter() - started
    return report


def _spared(excused: np.ndarray, ref) -> np.ndarray:
    """The samples whose outputs are not compared: excused by an explained flip, or unsure (``ReferenceRun.unsure``)."""
    return excused | ref.unsure if ref.unsure is not None else excused


def _batch_size(wanted: int, total: int, pool: ShardPool | None, remote) -> int:
    if pool is not None and pool.workers > 1:
        # several batches per worker, so that the last one to finish does not wait alone
        return max(32, min(wanted, -(-total // (4 * pool.workers))))
    # a child process for the runtimes: small batches, so that the cost is known early and the two interleave
    return min(wanted, 32) if remote is not None else wanted


def _new_report(model: nn.Module, info: ArtifactInfo, model_name: str, batches: Batches, tol: Tolerance,
                skipped: Sequence[tuple[str, str]]) -> ParityReport:
    report = ParityReport(model_name, str(info.path), batches.source, tol,
                          skipped=[{"backend": b, "reason": r} for b, r in skipped])
    artifact_tie = info.tie if isinstance(getattr(info, "tie", None), str) else None
    report.tie_rule = {"reference": _declared_tie(model), "artifact": artifact_tie}
    return report
