"""HTAF, the smooth sigmoid–tanh stand-in for the Heaviside step, and the exact step it hardens to."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..contracts import TIES, check_one_of

Levels = Literal["01", "pm1"]
Mode = Literal["smooth", "surrogate"]
Tie = Literal["ge", "gt"]

LEVELS: tuple[str, ...] = ("01", "pm1")
MODES: tuple[str, ...] = ("smooth", "surrogate")


def htaf_function(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """HTAF(x) = σ(α·x + β·tanh(x)), with values in (0, 1)."""
    return torch.sigmoid(alpha * x + beta * torch.tanh(x))


def htaf_derivative(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """dHTAF/dx = σ(z)·(1 − σ(z))·(α + β·(1 − tanh²(x))), z = α·x + β·tanh(x)."""
    s = htaf_function(x, alpha, beta)
    t = torch.tanh(x)
    return s * (1 - s) * (alpha + beta * (1 - t * t))


def exact_step(x: torch.Tensor, threshold: float, levels: str, tie: str) -> torch.Tensor:
    """Heaviside step of x − threshold: 1 (or +1) above, 0 (or −1) below; at the threshold, tie decides.

    ±1 levels are 2·H − 1, computed exactly in floating point.
    """
    fired = (x >= threshold if tie == "ge" else x > threshold).to(x.dtype)
    return fired if levels == "01" else 2 * fired - 1


class _SurrogateStep(torch.autograd.Function):
    """Forward: exact step. Backward: the gradient of HTAF (scaled by 2 for ±1 levels)."""

    @staticmethod
    def forward(ctx, x, threshold, alpha, beta, levels, tie):  # type: ignore[override]
        ctx.save_for_backward(x - threshold)
        ctx.alpha, ctx.beta, ctx.levels = alpha, beta, levels
        return exact_step(x, threshold, levels, tie)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        grad = htaf_derivative(u, ctx.alpha, ctx.beta)
        if ctx.levels == "pm1":
            grad = 2 * grad
        return grad_out * grad, None, None, None, None, None


class HTAF(nn.Module):
    """Heavy-tailed activation: a smooth, trainable stand-in for the Heaviside step.

    With u = x − threshold and z = α·u + β·tanh(u)::

        HTAF(u) = σ(z)                                   levels "01"
        HTAF(u) = 2·σ(z) − 1                             levels "pm1"
        dHTAF/du = σ(z)·(1 − σ(z))·(α + β·(1 − tanh²u))  (×2 for "pm1")

    HTAF(0) = ½ (0 for "pm1"), it rises monotonically, its slope at 0 is (α+β)/4 and its tails
    decay like e^(−α|u|): a large β gives a steep centre with heavy tails. Because z is odd and
    strictly increasing in u, HTAF(u) ≥ ½ exactly when u ≥ 0, so hardening to the exact step is
    exact for any α > 0, β ≥ 0.

    Modes: ``smooth`` (forward is HTAF) and ``surrogate`` (forward is the exact step, backward
    uses HTAF's gradient). ``tie`` is the value the hardened step takes at exactly the threshold:
    ``ge`` fires (step(0) = 1, sign(0) = +1), ``gt`` does not; None declares no rule, so the exporter's
    ``--tie`` decides (``ge`` when it is not given).
    """

    # constants of a scripted module (torch.jit.script): its graph then has no branch on the configuration
    __constants__ = ["alpha", "beta", "threshold", "levels", "mode", "tie"]

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 4.0,
        threshold: float = 0.0,
        levels: Levels = "01",
        mode: Mode = "smooth",
        tie: Tie | None = None,
    ) -> None:
        super().__init__()
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a positive finite number, got {alpha}")
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a non-negative finite number, got {beta}")
        check_one_of("levels", levels, LEVELS)
        check_one_of("mode", mode, MODES)
        if tie is not None:
            check_one_of("tie", tie, TIES)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.threshold = float(threshold)
        self.levels = levels
        self.mode = mode
        self.tie = tie

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "surrogate":
            tie = self.tie if self.tie is not None else "ge"
            # no gradient to shape (or a scripted module, which has no autograd.Function): the plain step
            if torch.jit.is_scripting() or not (self.training and torch.is_grad_enabled()):
                return exact_step(x, self.threshold, self.levels, tie)
            return _SurrogateStep.apply(x, self.threshold, self.alpha, self.beta, self.levels, tie)
        h = htaf_function(x - self.threshold, self.alpha, self.beta)
        return h if self.levels == "01" else 2 * h - 1

    # alpha and beta are often annealed during training (train.py sharpens alpha), so the values the
    # model was trained to travel in the state dict, not only the constructor config.
    def get_extra_state(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}

    def set_extra_state(self, state: dict) -> None:
        self.alpha = float(state.get("alpha", self.alpha))
        self.beta = float(state.get("beta", self.beta))

    def hardened(self, tie: Tie | None = None) -> "Step":
        """The exact step this site approximates."""
        return Step(threshold=self.threshold, levels=self.levels, tie=tie or self.tie or "ge")

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, threshold={self.threshold}, "
                f"levels={self.levels}, mode={self.mode}, tie={self.tie}")


class Step(nn.Module):
    """Exact step: levels "01" gives H(x − θ) ∈ {0, 1}; "pm1" gives sign = 2·H − 1 ∈ {−1, +1}.

    At x = θ, ``tie="ge"`` gives 1 (+1) and ``tie="gt"`` gives 0 (−1).
    """

    __constants__ = ["threshold", "levels", "tie"]

    def __init__(self, threshold: float = 0.0, levels: Levels = "01", tie: Tie = "ge") -> None:
        super().__init__()
        check_one_of("levels", levels, LEVELS)
        check_one_of("tie", tie, TIES)
        self.threshold = float(threshold)
        self.levels = levels
        self.tie = tie

    @property
    def onnx_op(self) -> str:
        return "Heaviside" if self.levels == "01" else "Sign"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # a scripted module is not compiled past here (no ONNX export hook)
            if torch.onnx.is_in_onnx_export():
                # One node in the htaf domain per call, so capture needs no pattern matching.
                threshold = torch.tensor(self.threshold, dtype=x.dtype)
                return torch.onnx.ops.symbolic(f"htaf::{self.onnx_op}", (x, threshold), attrs={"tie": self.tie},
                                               dtype=x.dtype, shape=x.shape, version=1)
        return exact_step(x, self.threshold, self.levels, self.tie)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, levels={self.levels}, tie={self.tie}"
