"""The reference: the hardened PyTorch model, run with every step's output and pre-activation recorded."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .nn import Step


@dataclass
class ReferenceRun:
    """One batch: the named outputs, and each step call's output and pre-activation (input − threshold).

    Step calls are keyed by (site, k), k counting the calls of a site within one forward pass.
    """

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    steps: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    preactivations: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def run_reference(model: nn.Module, inputs: tuple[torch.Tensor, ...], output_names: list[str],
                  device: str = "cpu", streaming: bool = False) -> ReferenceRun:
    """Run ``model`` and record every Step call, in call order per site (as capture numbers them)."""
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []

    def record(name: str, step: Step):
        def hook(_module, args, output):
            calls.setdefault(name, []).append((output.detach(), (args[0] - step.threshold).detach()))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, Step):
            hooks.append(m.register_forward_hook(record(name, m)))
    try:
        model = model.to(device).eval()
        forward = model.step if streaming else model  # streaming: one SNN time step, state in and out
        out = forward(*(t.to(device) for t in inputs))
    finally:
        for h in hooks:
            h.remove()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    run = ReferenceRun()
    for name, value in zip(output_names, outs):
        run.outputs[name] = value.detach().cpu().numpy()
    for site, records in calls.items():
        for k, (value, pre) in enumerate(records):
            run.steps[(site, k)] = value.cpu().numpy()
            run.preactivations[(site, k)] = pre.cpu().numpy()
    return run
