"""Crafted threshold inputs: inputs that put pre-activations exactly on, and one float step beside, thresholds.

Ordinary data rarely lands on a threshold, so it says little about the tie rule or about a threshold
that is off by one step. Validation therefore always adds inputs built for the purpose.

How they are built
------------------
A *site call* (site, k) is the k-th call of a step site in one forward pass; its pre-activation is
u = x_step − θ, where x_step is the step's input. Only site calls whose u varies continuously with the
model input are usable (the first binary layers, the first LIF layer at every time step, an ICBM
concept layer behind a ReLU backbone); sites behind another step see a step function of the input.

For a chosen unit j of such a site call:

1. *Newton*. From a seed input, u_j is made ≈ 0 by moving the input along ∂u_j/∂x (autograd through
   the hardened model). Two seed families:

   - ``single-term``: the zero input, moved along one coordinate only. The input then has exactly
     one non-zero element, so a dense or zero-padded convolution layer reading it computes every
     output as *one product plus the bias*, which every evaluation order (any summation order, with
     or without a fused multiply-add) rounds identically.
   - ``data``: a data sample, moved along the full gradient (a few Newton steps, which also cross the
     kinks of a ReLU backbone), then along its largest-gradient coordinate.

2. *Bisection on floats*. Along that one coordinate the float32 values are bisected as ordered
   integers until two adjacent floats t⁻ < t⁺ bracket the sign change of u_j. The crafted inputs are
   t⁻, t⁺ and the float after t⁺. When the reference computes u_j = 0 exactly at t⁺ that input is an
   *exact tie*; its neighbours lie one float step below and above. When no float gives exactly 0
   (a batch norm that PyTorch evaluates with a fused multiply-add is exactly 0 only where
   x·α = −β holds in real arithmetic, which trained parameters almost never allow) the two
   bracketing inputs are kept as *near* ties, as close to the threshold as float32 allows.

3. *Verification*. The whole crafted set is run through the reference once more; every role
   (tie / below / above / near) is read from the measured pre-activation, never assumed.

Certified ties are explained in ``htaf_export.certify``.

Memory and time are bounded: at most ``max_keys`` site calls, ``2·units`` single-term and
``units/2`` per data seed searches each, three inputs per search, evaluated in chunks of ``CHUNK``
rows; every probe stops the forward pass right after the last site call it needs. When one search
would not fit ``BUDGET_FLOPS`` operations in all, only the first site call is searched, with fewer units.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .nn.modules import set_eval
from .certify import CraftedPoint, certify
from .reference import forward_recording

CHUNK = 64
SMALL_MODEL = 2_000_000  # parameters
# crafting work aimed at (a few seconds here): fewer searches on a model whose forward pass is costly. Counted in
# floating-point operations, not timed, so that the same model gets the same crafted inputs everywhere.
BUDGET_FLOPS = 60e9
PASSES = 60  # forward passes one search costs, roughly (Newton steps, bracketing, bisection, checks)
NEWTON_STEPS = 4
EXPAND_STEPS = 12
MAX_BISECT = 80
ROLES = ("tie", "below", "above", "near")


@dataclass
class CraftedSet:
    """Inputs shaped like the model input, and what each was built to hit."""

    x: np.ndarray
    points: list[CraftedPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.x)

    @property
    def exact_ties(self) -> int:
        return sum(p.role == "tie" for p in self.points)

    @property
    def certified_ties(self) -> int:
        return sum(p.certified for p in self.points)

    def certified(self) -> list[CraftedPoint]:
        return [p for p in self.points if p.certified]

    def summary(self) -> dict[str, Any]:
        by_key: dict[str, dict[str, Any]] = {}
        for p in self.points:
            name = p.site if p.call == 0 else f"{p.site}@{p.call}"
            s = by_key.setdefault(name, {"site": p.site, "call": p.call, "tie": 0, "below": 0, "above": 0,
                                         "near": 0, "certified": 0, "closest_near": None})
            s[p.role] += 1
            s["certified"] += int(p.certified)
            if p.role == "near":
                s["closest_near"] = abs(p.pre) if s["closest_near"] is None else min(s["closest_near"], abs(p.pre))
        return {"samples": len(self.x), "exact_ties": self.exact_ties, "certified_ties": self.certified_ties,
                "near_ties": sum(p.role == "near" for p in self.points), "seconds": round(self.seconds, 3),
                "by_site": by_key, "notes": list(self.notes)}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "points": [asdict(p) for p in self.points]}


def _ordered(f: np.ndarray) -> np.ndarray:
    """float32 → int64 that orders like the floats (−0 and +0 both map to 0)."""
    b = np.asarray(f, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(b >= 0, b, -(b & 0x7FFFFFFF))


def _unordered(k: np.ndarray) -> np.ndarray:
    b = np.where(k >= 0, k, (-k) | 0x80000000).astype(np.int64)
    return b.astype(np.uint32).view(np.float32)


class _Probe:
    """Evaluates, for rows of candidate inputs, the pre-activation each row targets (and its gradient)."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], keys: list[tuple[str, int]]) -> None:
        self.model = model
        self.shape = list(input_shape)
        self.keys = keys

    def __call__(self, x: np.ndarray, key: np.ndarray, unit: np.ndarray, grad: bool = False):
        u = np.full(len(x), np.nan, dtype=np.float32)
        g = np.zeros_like(x) if grad else None
        for start in range(0, len(x), CHUNK):
            sl = slice(start, min(start + CHUNK, len(x)))
            xt = torch.from_numpy(np.ascontiguousarray(x[sl]).reshape(-1, *self.shape))
            xt.requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                _, calls = forward_recording(self.model, (xt,), keep_graph=grad, until=set(self.keys))
            found = {(c.site, c.call): c.pre for c in calls}
            picked = []
            for r in range(sl.stop - sl.start):
                pre = found.get(self.keys[key[start + r]])
                picked.append(pre.reshape(len(xt), -1)[r, unit[start + r]] if pre is not None
                              else torch.tensor(float("nan")))
            values = torch.stack(picked)
            u[sl] = values.detach().numpy()
            if grad:
                ok = torch.isfinite(values) & values.requires_grad
                if bool(ok.any()):
                    (gx,) = torch.autograd.grad(values[ok].sum(), xt, allow_unused=True)
                    if gx is not None:
                        g[sl] = gx.reshape(len(xt), -1).numpy()  # type: ignore[index]
        return (u, g) if grad else u


def _continuous_keys(model: nn.Module, input_shape: Sequence[int], seeds: np.ndarray, max_keys: int,
                     rng: np.random.Generator) -> list[tuple[tuple[str, int], int]]:
    """Site calls whose pre-activation varies with the input, in call order, with their unit counts."""
    x = torch.from_numpy(seeds.reshape(-1, *input_shape).copy()).requires_grad_(True)
    with torch.enable_grad():
        _, calls = forward_recording(model, (x,), keep_graph=True)
    keys = []
    for c in calls:
        if not c.pre.requires_grad:
            continue
        weights = torch.from_numpy(rng.standard_normal(tuple(c.pre.shape)).astype(np.float32))
        (gx,) = torch.autograd.grad((c.pre * weights).sum(), x, retain_graph=True, allow_unused=True)
        if gx is not None and bool((gx != 0).any()):
            keys.append(((c.site, c.call), int(c.pre[0].numel())))
        if len(keys) >= max_keys:
            break
    return keys


def _bisect(probe: _Probe, base: np.ndarray, key: np.ndarray, unit: np.ndarray, coord: np.ndarray,
            direction: np.ndarray, guess: np.ndarray):
    """Adjacent floats t⁻ < t⁺ of input coordinate ``coord`` with direction·u(t⁻) < 0 ≤ direction·u(t⁺)."""
    n = len(base)
    rows = np.arange(n)

    def f(t: np.ndarray, sel: np.ndarray) -> np.ndarray:
        x = base[sel].copy()
        x[np.arange(len(sel)), coord[sel]] = t
        return direction[sel] * probe(x, key[sel], unit[sel])

    delta = np.maximum(np.abs(guess), 1e-3).astype(np.float64) * 2.0**-12
    lo = (guess - delta).astype(np.float32)
    hi = (guess + delta).astype(np.float32)
    flo, fhi = f(lo, rows), f(hi, rows)
    for _ in range(EXPAND_STEPS):
        bad_lo, bad_hi = ~(flo < 0), ~(fhi >= 0)
        if not (bad_lo.any() or bad_hi.any()):
            break
        delta = np.where(bad_lo | bad_hi, delta * 16, delta)
        if bad_lo.any():
            lo[bad_lo] = (guess[bad_lo] - delta[bad_lo]).astype(np.float32)
            flo[bad_lo] = f(lo[bad_lo], rows[bad_lo])
        if bad_hi.any():
            hi[bad_hi] = (guess[bad_hi] + delta[bad_hi]).astype(np.float32)
            fhi[bad_hi] = f(hi[bad_hi], rows[bad_hi])
    valid = (flo < 0) & (fhi >= 0) & np.isfinite(lo) & np.isfinite(hi)
    klo, khi = _ordered(lo), _ordered(hi)
    for _ in range(MAX_BISECT):
        active = valid & (khi - klo > 1)
        if not active.any():
            break
        sel = rows[active]
        mid = klo[sel] + (khi[sel] - klo[sel]) // 2
        fm = f(_unordered(mid), sel)
        up = fm >= 0
        khi[sel[up]] = mid[up]
        klo[sel[~up]] = mid[~up]
        valid[sel[~np.isfinite(fm)]] = False
    return valid, klo, khi


@contextlib.contextmanager
def _threads_for(model: nn.Module):
    """Small models: one thread (many tiny forward passes, where thread hand-offs cost more than the
    arithmetic); large ones keep PyTorch's threads."""
    previous = torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def craft(model: nn.Module, input_shape: Sequence[int], seeds: np.ndarray | None = None, *, units: int = 12,
          data_seeds: int = 4, max_keys: int = 4, seed: int = 0) -> CraftedSet:
    """Build inputs on and beside the thresholds of ``model`` (hardened, eval mode); see the module docstring.

    ``seeds`` are data samples to start the ``data`` family from (the first ``data_seeds`` are used).
    """
    with _threads_for(model):
        return _craft(model, input_shape, seeds, units=units, data_seeds=data_seeds, max_keys=max_keys, seed=seed)


def _candidates(keys: list, zero: np.ndarray, data: np.ndarray, units: int, rng) -> tuple[np.ndarray, ...]:
    """Searches to run: (seed row, key index, unit, family), from zero (single-term) and from data seeds."""
    bases, key_of, unit_of, family = [], [], [], []
    for ki, (_, count) in enumerate(keys):
        chosen = rng.choice(count, size=min(2 * units, count), replace=False)
        for j in chosen:
            bases.append(zero[0]); key_of.append(ki); unit_of.append(int(j)); family.append("single-term")
        per_seed = max(1, units // 2)
        for s in data:
            for j in rng.choice(count, size=min(per_seed, count), replace=False):
                bases.append(s); key_of.append(ki); unit_of.append(int(j)); family.append("data")
    return np.stack(bases).astype(np.float32), np.array(key_of), np.array(unit_of), np.array(family)


def _flops_per_row(probe: _Probe, base, key_a, unit_a) -> float:
    """Multiply-adds (×2) of the probe's forward pass per input row: a count, not a timing, so the crafted set is
    the same on every machine and under any load."""
    sample = slice(0, min(4, len(base)))
    with FlopCounterMode(display=False) as counter:
        probe(base[sample], key_a[sample], unit_a[sample])
    return counter.get_total_flops() / max(sample.stop, 1)


def _within_budget(probe: _Probe, key_list: list, base, key_a, unit_a, fam, notes: list[str]) -> tuple:
    """Work budget: on a model too costly to search fully, keep the first site call only (the forward pass then
    stops right after it) and as many searches as fit, single-term ones first."""
    fit = int(BUDGET_FLOPS / max(_flops_per_row(probe, base, key_a, unit_a) * PASSES, 1.0))
    if fit >= len(base):
        return base, key_a, unit_a, fam
    first = key_a == 0
    base, key_a, unit_a, fam = base[first], key_a[first], unit_a[first], fam[first]
    probe.keys = key_list[:1]
    per_row = _flops_per_row(probe, base, key_a, unit_a)
    fit = int(BUDGET_FLOPS / max(per_row * PASSES, 1.0))
    total = len(base)
    order = np.concatenate([np.where(fam == "single-term")[0], np.where(fam == "data")[0]])
    keep = np.sort(order[:max(fit, 4)])
    notes.append(f"the model is costly to reach its later step sites: only the first ({key_list[0][0]}) was "
                 f"searched, {len(keep)} of {total} searches ({per_row / 1e6:.0f} MFLOP per input)")
    return base[keep], key_a[keep], unit_a[keep], fam[keep]


def _newton(probe: _Probe, base: np.ndarray, key_a, unit_a, is_data: np.ndarray) -> None:
    """Newton along the full gradient for the data family (crosses ReLU kinks in a few steps), in place."""
    for _ in range(NEWTON_STEPS):
        rows = np.where(is_data)[0]
        if not len(rows):
            break
        u, g = probe(base[rows], key_a[rows], unit_a[rows], grad=True)
        norm2 = (g.astype(np.float64) ** 2).sum(axis=1)
        ok = np.isfinite(u) & (norm2 > 0)
        step = np.where(ok, u / np.where(ok, norm2, 1.0), 0.0)[:, None] * g
        scale = np.abs(base[rows]).max(axis=1) + 1.0
        sane = np.abs(step).max(axis=1) <= 100 * scale
        base[rows[ok & sane]] = (base[rows[ok & sane]] - step[ok & sane]).astype(np.float32)


def _crossing_rows(probe: _Probe, base, key_a, unit_a, fam) -> list[tuple]:
    """Bisect one coordinate per search to the threshold; three inputs per crossing: t⁻, t⁺ and the float
    after t⁺ (in the direction u grows), as (input, key, unit, family, search, coordinate)."""
    u, g = probe(base, key_a, unit_a, grad=True)
    coord = np.abs(g).argmax(axis=1)
    gk = g[np.arange(len(base)), coord]
    usable = np.isfinite(u) & (gk != 0)
    base, key_a, unit_a, fam, coord, gk, u = (a[usable] for a in (base, key_a, unit_a, fam, coord, gk, u))
    guess = (base[np.arange(len(base)), coord].astype(np.float64) - u / gk).astype(np.float32)
    direction = np.sign(gk).astype(np.float32)
    valid, klo, khi = _bisect(probe, base, key_a, unit_a, coord, direction, guess)
    rows = []
    for c in np.where(valid)[0]:
        for k in (klo[c], khi[c], khi[c] + 1):
            x = base[c].copy()
            x[coord[c]] = _normal(_unordered(np.array([k]))[0])
            if np.isfinite(x).all():
                rows.append((x, key_a[c], unit_a[c], fam[c], c, coord[c]))
    return rows


def _normal(value: np.float32) -> np.float32:
    """A subnormal input moved to the smallest normal float of its sign: runtimes that flush subnormals to zero
    (LCE's quantizer) read it as 0, on the other side of a step at 0 that reads the input itself."""
    tiny = np.finfo(np.float32).tiny
    return np.float32(np.copysign(tiny, value)) if 0 < abs(value) < tiny else value


def _record(probe: _Probe, key_list: list, rows: list[tuple], result: CraftedSet) -> dict[int, int]:
    """Unique crafted inputs into ``result.x``; each (input, site call, unit) a point whose role comes from the
    pre-activation the reference computes now. Returns the coordinate each input was crafted along."""
    x_all = np.stack([r[0] for r in rows])
    x_unique, first, inverse = np.unique(x_all, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # keep rows in the order they were made
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    result.x = x_unique[order]
    sample_of = rank[inverse.reshape(-1)]
    measured = probe(x_all, np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))
    has_tie = {r[4] for r, v in zip(rows, measured) if v == 0}
    seen: set[tuple[int, str, int, int]] = set()
    coords: dict[int, int] = {}
    for i, v in enumerate(measured):
        if not np.isfinite(v):
            continue
        _, key, unit, family, search, coordinate = rows[i]
        site, call = key_list[key]
        point_key = (int(sample_of[i]), site, call, int(unit))
        if point_key in seen:
            continue
        seen.add(point_key)
        role = "tie" if v == 0 else ("near" if search not in has_tie else ("below" if v < 0 else "above"))
        result.points.append(CraftedPoint(int(sample_of[i]), site, call, int(unit), role, float(v), str(family)))
        coords[int(sample_of[i])] = int(coordinate)
    return coords


def _craft(model: nn.Module, input_shape: Sequence[int], seeds: np.ndarray | None, *, units: int,
           data_seeds: int, max_keys: int, seed: int) -> CraftedSet:
    start = time.perf_counter()
    shape = [int(d) for d in input_shape]
    dim = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    set_eval(model)
    zero = np.zeros((1, dim), np.float32)
    data = (np.asarray(seeds, dtype=np.float32).reshape(len(seeds), -1)[:data_seeds]
            if seeds is not None and len(seeds) else np.zeros((0, dim), np.float32))
    data = data[np.isfinite(data).all(axis=1)]
    result = CraftedSet(np.zeros((0, *shape), np.float32))
    keys = _continuous_keys(model, shape, np.concatenate([zero, data]), max_keys, rng)
    if not keys:
        result.notes.append("no step site's pre-activation varies continuously with the input "
                            "(or the reference records no steps): no crafted inputs")
        result.seconds = time.perf_counter() - start
        return result
    key_list = [k for k, _ in keys]
    probe = _Probe(model, shape, key_list)
    base, key_a, unit_a, fam = _within_budget(probe, key_list, *_candidates(keys, zero, data, units, rng),
                                              result.notes)
    _newton(probe, base, key_a, unit_a, fam == "data")
    rows = _crossing_rows(probe, base, key_a, unit_a, fam)
    if not rows:
        result.notes.append("no threshold crossing was found along any input coordinate")
        result.seconds = time.perf_counter() - start
        return result
    coords = _record(probe, key_list, rows, result)
    x_flat = result.x
    result.x = x_flat.reshape(-1, *shape)
    certify(model, shape, x_flat, result.points, coords)
    if not result.exact_ties:
        result.notes.append("no float32 input puts a pre-activation exactly on a threshold in the reference's "
                            "arithmetic (e.g. a batch norm evaluated with a fused multiply-add); the nearest "
                            "floats on either side are used instead")
    result.seconds = time.perf_counter() - start
    return result
