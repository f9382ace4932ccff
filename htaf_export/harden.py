"""Hardening: every smooth HTAF site becomes the exact step it approximates, and the gap is measured."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import outputs
from .errors import BadInput
from .model_state import buffers_kept
from .nn import HTAF, Step, htaf_function
from .harden_torchscript import harden_torchscript
from .harden_traced import export_batched, harden_graph_module
from .nn.binary import BinaryWeights
from .nn.modules import set_eval, step_modules

# A pre-activation is "unsaturated" when HTAF differs from the step by more than this, on the 0..1 scale.
GAP_TOLERANCE = 0.01


@dataclass
class Site:
    """One step site: where it is, the step it computes once hardened, and how it was found."""

    name: str
    levels: str
    threshold: float | None
    tie: str
    was: str  # "htaf" when hardened here, "step" when the model already had an exact step
    alpha: float | None = None
    beta: float | None = None
    mode: str | None = None
    how: str = "module"  # "HTAF module", "Step module", "HTAF composite", "exact step in a traced graph"


def unrecorded_tie_note(sites: list[Site], tie: str | None) -> str | None:
    """What to say when a traced graph's smooth HTAF sites lost their tie rule (the file records only the
    sigmoid–tanh formula), and the advice that works for this model."""
    smooth = [s.name for s in sites if s.how == "HTAF composite"]
    if tie is not None or not smooth:
        return None
    recorded = sorted({s.name for s in sites if s.how != "HTAF composite" and not s.how.startswith("torch.sign")
                       and s.tie == "ge"})
    advice = (f"--tie gt would conflict with the ge rule recorded at {', '.join(recorded)}: to keep a gt rule "
              f"there, export a checkpoint or a pickle of the model, which keep each site's rule" if recorded
              else "pass --tie gt if the model was trained to")
    return (f"a traced graph does not record the tie rule of a smooth HTAF: at {', '.join(map(repr, smooth))} the "
            f"step fires at the threshold itself (ge); {advice}")


@dataclass
class SiteGap:
    """How far a site's HTAF is from its step on calibration data."""

    name: str
    count: int
    unsaturated: int

    @property
    def fraction(self) -> float:
        return self.unsaturated / self.count if self.count else 0.0


@dataclass
class HardenResult:
    model: nn.Module
    sites: list[Site]
    tie: str | None
    gaps: list[SiteGap] = field(default_factory=list)
    smooth_accuracy: float | None = None
    hardened_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tie": self.tie,
            "sites": [asdict(s) for s in self.sites],
            "gaps": [{**asdict(g), "fraction": g.fraction} for g in self.gaps],
            "smooth_accuracy": self.smooth_accuracy,
            "hardened_accuracy": self.hardened_accuracy,
        }


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def find_sites(model: nn.Module) -> list[Site]:
    """Step sites of a module tree, in registration order; TorchScript submodules are matched by type name."""
    sites = []
    for name, m in model.named_modules():
        if isinstance(m, HTAF):
            sites.append(Site(name, m.levels, m.threshold, m.tie or "", "htaf", m.alpha, m.beta, m.mode,
                              "HTAF module"))
        elif isinstance(m, Step):
            sites.append(Site(name, m.levels, m.threshold, m.tie, "step", how="Step module"))
    return sites


def _traced_sites(found) -> list[Site]:
    return [Site(t.path, t.levels, t.threshold, t.tie, "htaf" if t.alpha is not None else "step", t.alpha, t.beta,
                 None, t.how) for t in found]


def _check_declared(sites: list[Site], tie: str | None) -> None:
    """``tie`` applies where the model declares no rule; a site that declares another one is an error."""
    if tie is None:
        return
    clash = [s for s in sites if s.tie and s.tie != tie]
    if clash:
        names = ", ".join(f"{s.name} ({s.tie})" for s in clash[:4])
        raise BadInput(f"--tie {tie} conflicts with the tie rule the model declares at {names}; drop --tie (it "
                       f"applies only to sites that declare none) or change the model")


def _harden_modules(model: nn.Module, tie: str | None) -> tuple[nn.Module, list[Site]]:
    """A copy of a module tree with each HTAF swapped for its Step and binary layers frozen."""
    hard = copy.deepcopy(model).eval()
    sites = find_sites(hard)
    _check_declared(sites, tie)
    for site in sites:
        if site.was == "htaf":
            step = hard.get_submodule(site.name).hardened(tie)  # type: ignore[operator]
            _set_submodule(hard, site.name, step)
            site.tie = step.tie
    for m in hard.modules():
        if isinstance(m, BinaryWeights):
            m.freeze()
    return hard, sites


def harden(model: nn.Module, data: Inputs | None = None, labels: torch.Tensor | None = None,
           tie: str | None = None, batch_size: int = 512, input_shapes: list[list[int]] | None = None,
           sign_as_step: bool = False) -> HardenResult:
    """Return a hardened copy of ``model`` (the input is not modified) and a record of its sites.

    Every HTAF becomes ``Step`` with the same threshold and levels; binary layers are frozen to
    exact ±1 weights. TorchScript and torch.export programs are hardened where they compute HTAF
    (``harden_traced``). ``tie`` applies to sites that declare no rule (an ``HTAF(tie=None)``, or any
    smooth site of a traced program); a site that declares another rule is an error. With ``data``,
    the hardening gap of each site is measured, and with ``labels`` the accuracy before and after.
    With ``input_shapes``, a module that computes the HTAF composite by hand in ``forward`` (no HTAF module
    to swap) is hardened through its traced program, as a .pt2 is. ``sign_as_step``: ``torch.sign`` of a computed
    tensor is a ±1 step too, its value at 0 the tie rule's (+1 for ``ge``) instead of 0 (traced programs only).
    """
    if not isinstance(model, nn.Module):
        hint = " (pass loaded.module, or a path to htaf_export.load first)" if hasattr(model, "module") or \
            isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else ""
        raise BadInput(f"harden takes an nn.Module, not {type(model).__name__}{hint}")
    if tie not in (None, "ge", "gt"):
        raise BadInput(f"tie must be 'ge' or 'gt', got {tie!r}")
    if isinstance(model, torch.jit.ScriptModule):
        if sign_as_step:
            raise BadInput("--sign-as-step reads torch.sign in a torch.export program; a TorchScript module "
                           "cannot be rewritten so: save the model as a .pt2 (torch.export) or a pickle")
        hard, found = harden_torchscript(model, tie)
        sites = _traced_sites(found)
    elif isinstance(model, torch.fx.GraphModule) and not find_sites(model):
        hard, found = harden_graph_module(model, tie, sign_as_step)
        sites = _traced_sites(found)
    else:
        hard, sites = _harden_modules(model, tie)
        hows = _traced_for(hard, input_shapes, sign_as_step) if input_shapes is not None else ()
        if hows:
            hard, sites = _through_program(hard, sites, tie, input_shapes, hows, sign_as_step)
    result = HardenResult(model=hard, sites=sites, tie=tie)
    if data is not None:
        result.gaps = measure_gap(model, data, batch_size)
        if labels is not None:
            result.smooth_accuracy = accuracy(model, data, labels, batch_size)
            result.hardened_accuracy = accuracy(hard, data, labels, batch_size)
    return result


class _Calls(TorchFunctionMode):
    """The names of the torch functions a forward pass calls."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


def _traced_for(model: nn.Module, input_shapes: list[list[int]], sign_as_step: bool) -> tuple[str, ...]:
    """How the steps that only a trace of ``model`` shows are found (``Site.how`` prefixes), when it has them: a
    forward pass that still calls both sigmoid and tanh once every HTAF module is a Step (an HTAF computed by
    hand), torch.heaviside (its ONNX form is no step a converter reads), torch.sign when it is read as a step, or
    returns a bool (a comparison read both as a decision and as a step, which ONNX capture cannot split). One
    small pass, so that only such models pay for a trace; () for the others."""
    calls = _Calls()
    try:
        with torch.no_grad(), calls, buffers_kept(model):
            out = model(*(torch.zeros(2, *shape) for shape in input_shapes))
    except Exception:  # noqa: BLE001 - a model that cannot run here is refused later, with its own message
        return ()
    found = {"HTAF composite": {"sigmoid", "tanh"} <= calls.seen, "torch.heaviside": "heaviside" in calls.seen,
             "torch.sign": sign_as_step and "sign" in calls.seen,
             "exact step": any(t.dtype == torch.bool for t in outputs.leaves(out))}
    return tuple(how for how, seen in found.items() if seen)


def _traced(model: nn.Module, sites: list[Site], tie: str | None, input_shapes: list[list[int]],
            sign_as_step: bool = False) -> tuple[torch.fx.GraphModule, list[Site], list[Site]] | None:
    """``model`` traced with torch.export, every site in it a Step call: (program, ``sites`` plus the sites only
    the program shows, those new sites); None when torch.export cannot trace it."""
    program = export_batched(model, input_shapes)
    if program is None:
        return None
    traced, found = harden_graph_module(program, tie, sign_as_step)
    known = {s.name for s in sites} | set(step_modules(model))
    more = [s for s in _traced_sites(found) if s.name not in known]
    return traced, sites + more, more


def _through_program(hard: nn.Module, sites: list[Site], tie: str | None, input_shapes: list[list[int]],
                     hows: tuple[str, ...], sign_as_step: bool = False) -> tuple[nn.Module, list[Site]]:
    """The traced program of ``hard`` with the steps only it shows (``hows``, from ``_traced_for``) hardened;
    ``hard`` as it is when it has none."""
    got = _traced(hard, sites, tie, input_shapes, sign_as_step)
    if got is None or not any(s.how.startswith(hows) for s in got[2]):
        return hard, sites
    return got[0], got[1]


def primary_output(out: Any) -> torch.Tensor:
    """The first output (the logits) of a model that may return a tuple, a dict or a nested mix."""
    return outputs.leaves(out)[0]


Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # one input, or one tensor per input of a multi-input model


def _rows(data: Inputs, start: int, stop: int) -> tuple[torch.Tensor, ...]:
    return tuple(x[start:stop] for x in data) if isinstance(data, tuple) else (data[start:stop],)


def _count(data: Inputs) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


@torch.no_grad()
def accuracy(model: nn.Module, data: Inputs, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Share of samples whose scored output (``outputs.scored``: the logits, not a concept bottleneck's
    concepts) has its largest value at the label."""
    model = set_eval(model)
    correct, scored = 0, None
    for i in range(0, _count(data), batch_size):
        values = outputs.leaves(model(*_rows(data, i, i + batch_size)))
        scored = outputs.scored(values) if scored is None else scored
        correct += int((values[scored].argmax(dim=1) == labels[i:i + batch_size]).sum())
    return correct / max(_count(data), 1)


@torch.no_grad()
def measure_gap(model: nn.Module, data: Inputs, batch_size: int = 512) -> list[SiteGap]:
    """Share of pre-activations per HTAF site where |HTAF(u) − H(u)| > GAP_TOLERANCE (0..1 scale)."""
    gaps: dict[str, SiteGap] = {}
    hooks = []

    def record(name: str, m: HTAF):
        def hook(_module, inputs, _output):
            u = inputs[0] - m.threshold
            h = htaf_function(u, m.alpha, m.beta)
            step = (u > 0).to(h.dtype) if m.tie == "gt" else (u >= 0).to(h.dtype)
            g = gaps.setdefault(name, SiteGap(name, 0, 0))
            g.count += u.numel()
            g.unsaturated += int(((h - step).abs() > GAP_TOLERANCE).sum())
        return hook

    for name, m in model.named_modules():
        if isinstance(m, HTAF):
            hooks.append(m.register_forward_hook(record(name, m)))
    try:
        set_eval(model)
        for i in range(0, _count(data), batch_size):
            model(*_rows(data, i, i + batch_size))
    finally:
        for h in hooks:
            h.remove()
    return list(gaps.values())


def record_every_step(result: HardenResult, input_shapes: list[list[int]], sites: list[str],
                      every: bool = False) -> HardenResult:
    """``result`` with a model whose every step in ``sites`` is a Step call, so the reference records it.

    A module model may compute steps by hand in ``forward`` ((x > t).float(), where(x >= 0, 1, -1), an
    autograd.Function): the capture lifts them to ``htaf`` ops, but no Step module computes them. Such a
    model is traced with torch.export and its steps made Step calls (``harden_graph_module``); the program
    computes the same function, and every step can be checked bit for bit. TorchScript and graph modules
    are returned as they are (they have no module tree to extend). ``every``: trace even when every site named
    is recorded (``inspect``, which has no artifact to name them)."""
    model = result.model
    if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        return result
    recorded = set(step_modules(model))
    if all(site in recorded for site in sites) and not every:
        return result
    got = _traced(model, result.sites, result.tie, input_shapes)
    if got is None:  # the capture succeeded through another route: validate through the outputs then
        return result
    return replace(result, model=got[0], sites=got[1])
