"""Leaky integrate-and-fire neurons whose spike is an HTAF site."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .htaf import HTAF, Step

Reset = Literal["subtract", "zero"]


class LIF(nn.Module):
    """Leaky integrate-and-fire neuron, one time step per call.

    v[t] = leak · v[t−1] + I[t]
    s[t] = spike(v[t])                       spike: an HTAF site with the firing threshold θ
    v[t] ← v[t] − s[t]·θ                     reset "subtract"
    v[t] ← v[t] · (1 − s[t])                 reset "zero"

    In training the spike is HTAF (usually in surrogate mode); hardened, it is the exact step
    s = H(v − θ), which fires at v = θ under tie "ge" and not under "gt".
    """

    def __init__(
        self,
        leak: float = 0.9,
        threshold: float = 1.0,
        reset: Reset = "subtract",
        alpha: float = 2.0,
        beta: float = 4.0,
        mode: str = "surrogate",
        tie: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= leak <= 1.0:
            raise ValueError(f"leak must lie in [0, 1], got {leak}")
        if reset not in ("subtract", "zero"):
            raise ValueError(f"reset must be 'subtract' or 'zero', got {reset!r}")
        self.leak = float(leak)
        self.threshold = float(threshold)
        self.reset = reset
        self.spike: HTAF | Step = HTAF(alpha, beta, threshold=threshold, levels="01", mode=mode, tie=tie)  # type: ignore[arg-type]

    def forward(self, current: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.leak * v + current
        s = self.spike(v)
        # The reset does not carry gradient (as in snnTorch and SpikingJelly's detach_reset).
        r = s.detach()
        v = v - r * self.threshold if self.reset == "subtract" else v * (1 - r)
        return s, v

    def extra_repr(self) -> str:
        return f"leak={self.leak}, threshold={self.threshold}, reset={self.reset}"
