"""Kernel rewrites that change how a convolution is written, never what it computes."""

from __future__ import annotations

import numpy as np


def spread(weight: np.ndarray, dilation: tuple[int, int]) -> np.ndarray:
    """An OIHW ``weight`` with ``dilation`` written out as zeros between its taps: the same convolution at
    dilation 1 (exact: each zero adds +0·x)."""
    dh, dw = (int(d) for d in dilation)
    out_ch, in_ch, kh, kw = weight.shape
    spread_out = np.zeros((out_ch, in_ch, (kh - 1) * dh + 1, (kw - 1) * dw + 1), weight.dtype)
    spread_out[:, :, ::dh, ::dw] = weight
    return spread_out
