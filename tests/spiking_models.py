"""Spiking models users write by hand, shared by the test modules of several targets."""

from __future__ import annotations

import torch


def zero_reset_lif(v: torch.Tensor, current: torch.Tensor, leak: float, threshold: float):
    """One step of a hand-written LIF layer with a zero reset: (spikes, membrane after the reset)."""
    v = leak * v + current
    spikes = (v >= threshold).float()
    return spikes, v * (1 - spikes)


class AudioSNN(torch.nn.Module):
    """A spiking net on audio features (channels × frames): a strided Conv1d encoder and a dilated grouped Conv1d
    between two hand-written zero-reset LIF layers."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Conv1d(5, 8, 3, padding=1, stride=2)
        self.dw = torch.nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.out = torch.nn.Linear(8 * 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v1, v2, total = torch.zeros(x.shape[0], 8, 10), torch.zeros(x.shape[0], 8, 10), 0
        current = self.enc(x)
        for _ in range(4):
            s1, v1 = zero_reset_lif(v1, current, 0.75, 0.5)
            s2, v2 = zero_reset_lif(v2, self.dw(s1), 0.75, 0.5)
            total = total + self.out(s2.flatten(1))
        return total
