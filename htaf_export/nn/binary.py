"""Binary-weight layers: ±1 weights (optionally × a per-output-channel scale), real latent weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1 forward; straight-through gradient clipped to |w| ≤ 1 (as larq's ste_sign)."""

    @staticmethod
    def forward(ctx, w):  # type: ignore[override]
        ctx.save_for_backward(w)
        return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        return grad_out * (w.abs() <= 1).to(grad_out.dtype)


class BinaryWeights(nn.Module):
    """Shared weight handling: latent real weights while training, exact ±1 once frozen.

    A frozen layer keeps its ±1 weights in ``weight`` and its per-channel scale in the ``scale``
    buffer, so the exported graph holds the ±1 tensor itself as an initializer (packable to one
    bit per weight) rather than a sign op over latent weights.
    """

    # (no class-level annotations: torch.jit.script cannot read them as strings, and users script these layers)

    def _reduce_dims(self) -> list[int]:
        return list(range(1, self.weight.dim()))

    def binary_weight(self) -> torch.Tensor:
        if self.frozen:
            return self.weight
        if torch.jit.is_scripting() or not (self.training and torch.is_grad_enabled()):
            # no gradient to shape: the forward alone, which TorchScript can save (an autograd.Function cannot)
            w = self.weight
            return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
        return _SignSTE.apply(self.weight)

    def channel_scale(self) -> torch.Tensor | None:
        if not self.scaled:
            return None
        if self.frozen:
            return self.scale
        return self.weight.abs().mean(dim=self._reduce_dims())

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace latent weights by their ±1 signs and fix the scale (idempotent)."""
        if self.frozen:
            return
        if self.scaled:
            self.scale.copy_(self.channel_scale())
        self.weight.copy_(torch.where(self.weight >= 0, 1.0, -1.0))
        self.frozen = True

    # Whether the layer is frozen travels in the state dict, so a saved hardened model reloads as one.
    def get_extra_state(self) -> dict:
        return {"frozen": self.frozen}

    def set_extra_state(self, state: dict) -> None:
        self.frozen = bool(state.get("frozen", False))

    def _apply_scale(self, y: torch.Tensor) -> torch.Tensor:
        s = self.channel_scale()
        if s is None:
            return y
        shape = [1, -1] + [1] * (y.dim() - 2)
        return y * s.reshape(shape)


class BinaryLinear(BinaryWeights):
    """y = (x · sign(W)ᵀ) · s + b, sign(0) = +1, s the per-output scale mean|W| when ``scale``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scale: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scaled = scale
        self.frozen = False
        self.register_buffer("scale", torch.ones(out_features) if scale else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._apply_scale(F.linear(x, self.binary_weight()))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, scale={self.scaled}"


class BinaryConv2d(BinaryWeights):
    """y = conv(pad(x, pad_value), sign(W)) · s + b.

    Binary activations are ±1 and cannot represent 0, so padding uses ``pad_value`` = +1 by default,
    as binary runtimes (LCE with ``pad_values=1``) do. A first layer that sees real inputs can pad
    with 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        pad_value: float = 1.0,
        bias: bool = False,
        scale: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.pad_value = float(pad_value)
        fan_in = in_channels * kernel_size * kernel_size
        bound = 1.0 / fan_in**0.5
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scaled = scale
        self.frozen = False
        self.register_buffer("scale", torch.ones(out_channels) if scale else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding:
            p = self.padding
            x = F.pad(x, (p, p, p, p), value=self.pad_value)
        y = self._apply_scale(F.conv2d(x, self.binary_weight(), stride=self.stride))
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, pad_value={self.pad_value}, bias={self.bias is not None}, scale={self.scaled}")
