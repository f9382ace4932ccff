"""The reference: the hardened PyTorch model, run with every step's output and pre-activation recorded."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn

from . import outputs
from .nn.modules import set_eval, step_modules
from .nn import Step
from .parity import Tolerance


@dataclass
class ReferenceRun:
    """One batch: the named outputs, and each step call's output and pre-activation (input − threshold).

    Step calls are keyed by (site, k), k counting the calls of a site within one forward pass.
    ``order`` lists the keys in the order the calls happened (graph order for a feed-forward model).
    """

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    steps: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    preactivations: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    order: list[tuple[str, int]] = field(default_factory=list)
    ties: set[str] = field(default_factory=set)  # the tie rules the recorded steps applied
    # per sample, where the steps come from the captured graph (TorchScript): the model's outputs differ from the
    # graph's and a step input lies within the flip margin of its threshold, so the model may have decided that
    # near tie the other way; its outputs there are not the graph's steps' consequence and are not compared
    unsure: np.ndarray | None = None


@dataclass
class StepCall:
    """What one call of a Step recorded: its input, its output and its pre-activation (input − threshold)."""

    site: str
    call: int
    threshold: float
    input: torch.Tensor
    output: torch.Tensor
    pre: torch.Tensor
    tie: str | None = None


_COMPARISONS = ("ge.Scalar", "gt.Scalar", "ge.Tensor", "gt.Tensor")


def _fx_site(node: torch.fx.Node) -> str | None:
    """The module path of a graph node that sits inside a Step (torch.export records the module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    name = str(kind).rsplit(".", 1)[-1].strip("'>")
    return str(path) if name == "Step" else None


class _Enough(Exception):
    """Raised inside a forward pass once every step call that was asked for has been recorded."""


class StepInterpreter(torch.fx.Interpreter):
    """Runs a graph module from torch.export and records its steps, which appear there as plain comparisons.

    A step call is the comparison node (x ≥ θ or x > θ) inside a Step's module scope; its output is the
    last value computed in that scope (the cast, or 2·H − 1 for sign levels).
    """

    def __init__(self, module: torch.fx.GraphModule, calls: list[StepCall], keep_graph: bool,
                 until: set[tuple[str, int]] | None = None) -> None:
        super().__init__(module)
        self.calls, self.keep_graph, self.until = calls, keep_graph, until
        self.counts: dict[str, int] = {}
        self.current: StepCall | None = None

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        site = _fx_site(n) if n.op == "call_function" else None
        if site is not None and str(n.target).endswith(_COMPARISONS):
            args, _ = self.fetch_args_kwargs_from_env(n)
            x, threshold = args[0], args[1]
            threshold = float(threshold) if not isinstance(threshold, torch.Tensor) else float(threshold.reshape(-1)[0])
            pre = x - threshold
            if not self.keep_graph:
                x, pre = x.detach(), pre.detach()
            k = self.counts.get(site, 0)
            self.counts[site] = k + 1
            tie = "ge" if str(n.target).startswith("aten.ge") else "gt"
            if self.until is not None and _all_seen(self.calls, self.until):
                raise _Enough
            self.current = StepCall(site, k, threshold, x, value, pre, tie)
            self.calls.append(self.current)
        elif site is not None and self.current is not None and self.current.site == site:
            if isinstance(value, torch.Tensor):
                self.current.output = value if self.keep_graph else value.detach()
        elif n.op != "get_attr":
            self.current = None
        return value


def _all_seen(calls: list[StepCall], wanted: set[tuple[str, int]]) -> bool:
    return wanted <= {(c.site, c.call) for c in calls}


def traced_steps(model: nn.Module) -> bool:
    """True for a graph module whose steps can only be seen by interpreting its graph."""
    return isinstance(model, torch.fx.GraphModule) and not step_modules(model)


def forward_recording(model: nn.Module, inputs: tuple[torch.Tensor, ...], keep_graph: bool = False,
                      streaming: bool = False, until: set[tuple[str, int]] | None = None
                      ) -> tuple[object, list[StepCall]]:
    """Run the model on ``inputs`` and return (its output, every Step call in call order).

    Works for modules with Step submodules (forward hooks) and for torch.export graph modules (graph
    interpretation). TorchScript modules run, but their steps are not recorded. With ``until``, the
    forward pass stops once those (site, call) keys are recorded (the output is then None), so probing
    early layers of a deep model costs only those layers.
    """
    try:
        if traced_steps(model) and not streaming:
            calls: list[StepCall] = []
            out = StepInterpreter(model, calls, keep_graph, until).run(*inputs)  # type: ignore[arg-type]
            return out, calls
        forward = model.step if streaming else model  # streaming: one SNN time step, state in and out
        with record_steps(model, keep_graph, until) as calls:
            out = forward(*inputs)
        return out, calls
    except _Enough:
        return None, calls


@contextlib.contextmanager
def record_steps(model: nn.Module, keep_graph: bool = False,
                 until: set[tuple[str, int]] | None = None) -> Iterator[list[StepCall]]:
    """Record every Step call made inside the ``with`` block, in call order.

    With ``keep_graph`` the recorded tensors stay attached to autograd (crafting differentiates the
    pre-activation with respect to the input); otherwise they are detached. With ``until``, the next
    Step call after all those keys were recorded raises ``_Enough`` (see ``forward_recording``).
    """
    calls: list[StepCall] = []
    counts: dict[str, int] = {}
    hooks = []

    def record(name: str, step: Step):
        def hook(_module, args, output):
            if until is not None and _all_seen(calls, until):
                raise _Enough
            x = args[0]
            pre = x - step.threshold
            if not keep_graph:
                x, output, pre = x.detach(), output.detach(), pre.detach()
            k = counts.get(name, 0)
            counts[name] = k + 1
            calls.append(StepCall(name, k, step.threshold, x, output, pre, step.tie))
        return hook

    for name, m in step_modules(model).items():
        hooks.append(m.register_forward_hook(record(name, m)))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def run_reference(model: nn.Module, inputs: tuple[torch.Tensor, ...], output_names: list[str],
                  device: str = "cpu", streaming: bool = False, graph_steps=None,
                  tol: Tolerance | None = None) -> ReferenceRun:
    """Run ``model`` and record every Step call, in call order per site (as capture numbers them).

    The model is moved to ``device`` in place; pass a copy when the original must stay where it is.
    ``graph_steps`` (``runtimes.onnxruntime.GraphSteps``): where the model records no step (TorchScript), its
    steps and pre-activations from its captured graph; the outputs stay the model's own.
    """
    model = model.to(device)
    set_eval(model)
    out, calls = forward_recording(model, tuple(t.to(device) for t in inputs), streaming=streaming)
    run = ReferenceRun()
    for name, value in zip(output_names, outputs.leaves(out)):
        run.outputs[name] = value.detach().cpu().numpy()
    if not calls and graph_steps is not None:
        steps, captured = graph_steps.run([t.cpu().numpy() for t in inputs])
        for site, call, bits, pre in steps:
            run.steps[(site, call)], run.preactivations[(site, call)] = bits, pre
            run.order.append((site, call))
        run.unsure = unsure_rows(run.outputs, captured, list(run.preactivations.values()), tol or Tolerance())
    for c in calls:
        key = (c.site, c.call)
        run.steps[key] = c.output.cpu().numpy()
        run.preactivations[key] = c.pre.cpu().numpy()
        run.order.append(key)
        if c.tie:
            run.ties.add(c.tie)
    return run


def unsure_rows(model_outputs: dict[str, np.ndarray], captured: dict[str, np.ndarray], pres: list[np.ndarray],
                tol: Tolerance) -> np.ndarray | None:
    """The samples whose outputs from the model and from its captured graph differ beyond the fixed tolerance
    while some step input of the graph lies within the flip margin of its threshold (see ``ReferenceRun.unsure``)."""
    shared = [name for name in model_outputs if name in captured and captured[name].size == model_outputs[name].size]
    if not shared or not pres:
        return None
    n = len(model_outputs[shared[0]])
    differs = np.zeros(n, bool)
    for name in shared:
        ours = model_outputs[name].reshape(n, -1)
        theirs = captured[name].reshape(n, -1).astype(ours.dtype)
        differs |= (np.abs(ours - theirs) > tol.atol + tol.rtol * np.abs(theirs)).any(axis=1)
    near = np.zeros(n, bool)
    for pre in pres:
        near |= (np.abs(pre.reshape(n, -1)) <= tol.flip_margin).any(axis=1)
    return differs & near
