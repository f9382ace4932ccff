"""Spiking networks: LIF layers run for a fixed number of time steps on a constant (direct-coded) input."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn import LIF
from .registry import ReferenceModel, register


@register("snn_mlp")
class SnnMLP(ReferenceModel):
    """x → [fc_i → lif_i]… → fc_out, run for ``steps`` time steps; logits are fc_out averaged over time.

    ``step(x, *v)`` is one time step with the membrane potentials as explicit state, which is what a
    streaming device runs; ``forward`` unrolls it from zero state.
    """

    family = "snn"

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (128, 128), classes: int = 10,
                 steps: int = 8, leak: float = 0.9, threshold: float = 1.0, reset: str = "subtract",
                 alpha: float = 2.0, beta: float = 4.0, mode: str = "surrogate", tie: str = "ge") -> None:
        super().__init__(dict(in_features=in_features, hidden=hidden, classes=classes, steps=steps, leak=leak,
                              threshold=threshold, reset=reset, alpha=alpha, beta=beta, mode=mode, tie=tie),
                         [in_features])
        self.steps = steps
        self.hidden = list(hidden)
        self.fcs = nn.ModuleList()
        self.lifs = nn.ModuleList()
        width = in_features
        for h in hidden:
            self.fcs.append(nn.Linear(width, h))
            self.lifs.append(LIF(leak, threshold, reset, alpha, beta, mode, tie))  # type: ignore[arg-type]
            width = h
        self.fc_out = nn.Linear(width, classes)

    def initial_state(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, h) for h in self.hidden]

    def step(self, x: torch.Tensor, *v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, new_v = x, []
        for fc, lif, v_i in zip(self.fcs, self.lifs, v):
            h, v_next = lif(fc(h), v_i)
            new_v.append(v_next)
        return (self.fc_out(h), *new_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = [torch.zeros(x.shape[0], h, dtype=x.dtype, device=x.device) for h in self.hidden]
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        for _ in range(self.steps):
            out, *v = self.step(x, *v)
            total = total + out
        return total / self.steps
