"""Comparing one batch: an artifact's tensors against the reference's, by the parity rules of
``htaf_export.validate`` (its docstring states them); and which samples need rounding bounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from . import bounds
from .errors import BadInput
from .parity import EXAMPLES, Example, TensorResult, Tolerance
from .runtimes import ArtifactInfo



def _example(t: TensorResult, part: str, offset: int, mask: np.ndarray, ref: np.ndarray, got: np.ndarray,
             pre: np.ndarray | None, cert: np.ndarray | None) -> None:
    if len(t.examples) >= EXAMPLES:
        return
    for s, j in zip(*np.nonzero(mask)):
        if len(t.examples) >= EXAMPLES:
            return
        t.examples.append(Example(part, offset + int(s), int(j), float(ref[s, j]), float(got[s, j]),
                                  float(pre[s, j]) if pre is not None else None,
                                  bool(cert[s, j]) if cert is not None else False))


def compare_binary(t: TensorResult, ref: np.ndarray, got: np.ndarray, pre: np.ndarray | None,
                    certified: np.ndarray | None, excused: np.ndarray,
                    margin: float | np.ndarray | Callable[[], np.ndarray], part: str, offset: int) -> None:
    """``margin``: how far from its threshold a flipped bit is still rounding (an array, or a function
    that computes it, called only when a bit flipped)."""
    n = len(ref)
    ref2, got2 = ref.reshape(n, -1), np.asarray(got).reshape(n, -1)
    if ref2.shape != got2.shape:
        raise BadInput(f"tensor {t.name}: the artifact gives shape {list(np.shape(got))}, "
                       f"the reference {list(ref.shape)}")
    active = ~excused
    t.excused_samples += int(excused.sum())
    t.elements += int(active.sum()) * ref2.shape[1]
    flips = (ref2 != got2) & active[:, None]
    t.mismatched += int(flips.sum())
    cert = certified & active[:, None] if certified is not None else None
    if cert is not None:
        t.certified_ties += int(cert.sum())
    if pre is None:
        if flips.any():
            _example(t, part, offset, flips, ref2, got2, None, None)
        return
    pre2 = pre.reshape(n, -1)
    apre = np.abs(pre2)
    if active.any():
        least = float(apre[active].min())
        t.min_margin = least if t.min_margin is None else min(t.min_margin, least)
    at_tie = (pre2 == 0) & active[:, None]
    t.exact_ties += int(at_tie.sum())
    if not flips.any():
        return
    t.tie_flips += int((flips & at_tie).sum())
    if callable(margin):
        margin = margin()
    allowed = margin.reshape(n, -1) if isinstance(margin, np.ndarray) else margin
    close = flips & (apre <= allowed)
    # a tie whose bound is 0 (an integer sum, computed exactly everywhere) is as certain as a crafted one
    proven = at_tie & (np.asarray(allowed) == 0)
    cert = proven if cert is None else (cert | proven)
    violations = flips & cert
    t.tie_violations += int(violations.sum())
    close &= ~cert
    t.explained += int(close.sum())
    bad = flips & ~close
    if bad.any():
        _example(t, part, offset, bad, ref2, got2, pre2, cert)
    # A sample whose every flip is explained carries on excused: what follows depends on the flip.
    excused |= close.any(axis=1) & ~bad.any(axis=1)


def compare_float(t: TensorResult, ref: np.ndarray, got: np.ndarray, excused: np.ndarray, tol: Tolerance,
                   part: str, offset: int, bound: np.ndarray | None = None) -> None:
    n = len(ref)
    active = ~excused
    t.excused_samples += int(excused.sum())
    got = np.asarray(got)
    if ref.reshape(n, -1).shape != got.reshape(n, -1).shape:
        raise BadInput(f"tensor {t.name}: the artifact gives shape {list(got.shape)}, the reference {list(ref.shape)}")
    ref2, got2 = ref.reshape(n, -1)[active], got.reshape(n, -1)[active]
    t.elements += int(ref2.size)
    if ref2.size:
        err = np.abs(ref2.astype(np.float64) - got2.astype(np.float64))
        err = np.where(np.isnan(err), np.inf, err)
        t.max_abs_error = max(t.max_abs_error, float(err.max()))
        allowed = 2 * bound.reshape(n, -1)[active] if bound is not None else tol.atol + tol.rtol * np.abs(ref2)
        bad = err > allowed
        t.mismatched += int(bad.sum())
        if bad.any():
            rows = np.nonzero(active)[0]
            full = np.zeros((n, ref.reshape(n, -1).shape[1]), bool)
            full[rows] = bad
            _example(t, part, offset, full, ref.reshape(n, -1), got.reshape(n, -1), None, None)


def close_to_last_bit(ref: np.ndarray, got) -> np.ndarray:
    """Per sample: every element within 4 units in the last place of the reference (a rounding any
    bound allows; such samples need no bound)."""
    n = len(ref)
    got = np.asarray(got)
    if got.size != ref.size:
        return np.ones(n, bool)  # the comparison reports the shape
    ref, got = ref.astype(np.float64), got.reshape(ref.shape).astype(np.float64)  # bool and integer outputs too
    return (np.abs(ref - got) <= 4 * bounds.U * np.abs(ref)).reshape(n, -1).all(axis=1)


def rows_needing_bounds(info: ArtifactInfo, ref, arts: list[dict[str, np.ndarray]], n: int) -> np.ndarray:
    rows = np.zeros(n, bool)
    steps = {s.tensor: (s.site, s.call) for s in info.steps}
    for art in arts:
        for name, key in steps.items():
            if key in ref.steps and name in art and np.size(art[name]) == ref.steps[key].size:
                rows |= (ref.steps[key].reshape(n, -1) != np.asarray(art[name]).reshape(n, -1)).any(axis=1)
        for name in info.output_names:
            if name not in steps and name in art and name in ref.outputs:
                rows |= ~close_to_last_bit(ref.outputs[name], art[name])
    return rows


@dataclass
class BatchBounds:
    """Rounding bounds of one batch, full size; rows that needed none hold what passes them anyway
    (0 for step inputs, whose bits all agree; 2u·|ref| for float outputs within 4u·|ref|)."""

    outputs: dict[str, np.ndarray]
    steps: dict[tuple[str, int], Union[np.ndarray, Callable[[], np.ndarray]]]  # a function: computed on demand

    def step_margin(self, key: tuple[str, int]) -> np.ndarray | Callable[[], np.ndarray] | None:
        """Twice the bound of a step's input (two implementations each within it), or how to compute it."""
        bound = self.steps.get(key)
        if callable(bound):
            return lambda: 2 * bound()
        return None if bound is None else 2 * bound

    @classmethod
    def scatter(cls, rows: np.ndarray, outs: dict[str, np.ndarray], steps: dict[tuple[str, int], np.ndarray],
                ref) -> "BatchBounds":
        full_outs = {}
        for name, b in outs.items():
            full = 2 * bounds.U * np.abs(ref.outputs[name]).astype(np.float32)
            full[rows] = b
            full_outs[name] = full
        full_steps = {}
        for key, b in steps.items():
            full = np.zeros((len(rows), *b.shape[1:]), np.float32)
            full[rows] = b
            full_steps[key] = full
        return cls(full_outs, full_steps)


def ordered_tensors(info: ArtifactInfo) -> list[TensorResult]:
    layers = getattr(info, "layers", {}) or {}
    steps = [TensorResult(s.tensor, "binary", s.site, layers.get(s.tensor)) for s in info.steps]
    step_names = {s.tensor for s in info.steps}
    outputs = [TensorResult(o, "float") for o in info.output_names if o not in step_names]
    return steps + outputs


def argmax_explained(ref: np.ndarray, tol: Tolerance) -> np.ndarray:
    """Samples whose reference top two values are within tolerance of each other (a tie between classes)."""
    r = ref.reshape(len(ref), -1).astype(np.float64)
    if r.shape[1] < 2:
        return np.zeros(len(r), bool)
    top2 = np.sort(r, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) <= tol.atol + tol.rtol * np.abs(top2[:, 1])


def classes(outputs: np.ndarray, indices: bool) -> np.ndarray:
    """Each sample's class: the output itself where it is a class index, else the position of its largest value."""
    return outputs[:, 0] if indices else outputs.argmax(1)


def near_hidden_steps(ref, seen: set[tuple[str, int]], found: BatchBounds | None, flip_margin: float, n: int
                      ) -> np.ndarray:
    """Samples with a pre-activation within rounding of its threshold at a step the file keeps in no tensor (fused
    into a kernel, folded into a binary layer's thresholds; ``seen`` are the others): such a step may flip there
    unseen, and what follows with it, so their outputs are not compared (as after an explained flip); the other
    samples' outputs still are. The margin is the step's derived one, else ``flip_margin``."""
    near = np.zeros(n, dtype=bool)
    for key, pre in ref.preactivations.items():
        if key in seen:
            continue
        margin = found.step_margin(key) if found is not None else None
        margin = np.float32(flip_margin) if margin is None else (margin() if callable(margin) else margin).reshape(n, -1)
        # an exact sum (margin 0) decides the same in every correct file, its ties included: never spared
        near |= ((np.abs(pre.reshape(n, -1)) <= margin) & (margin > 0)).any(axis=1)
    return near
