"""Certified ties: crafted exact ties that every correct float32 implementation reproduces.

An exact tie in the reference's arithmetic is a tie in the artifact's arithmetic only when both
compute the pre-activation identically. A ``single-term`` exact tie is *certified* when, in addition:

- the step's input equals, bit for bit, the output of a dense or zero-padded convolution layer that
  reads the model input directly (checked at the tie and at four other values along the same
  coordinate, so a batch norm or any other rounding operation in between rules it out), and
- one product plus the bias rounds to exactly θ both ways an implementation may evaluate it:
  fl(fl(w·x) + b) and, fused, fl(w·x + b) (emulated in float64).

On a certified tie every correct float32 implementation computes u = 0 exactly, so the declared tie
rule alone decides the output bit: validation allows no flip there (see ``validate``). Other exact
ties are reported and counted but follow the ordinary rounding-margin rule.

"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .nn import BinaryConv2d, BinaryLinear
from .reference import StepInterpreter, forward_recording, record_steps

@dataclass
class CraftedPoint:
    """One crafted input and the unit it was built for."""

    sample: int  # row of CraftedSet.x
    site: str
    call: int
    unit: int  # flat index within one sample's tensor
    role: str  # tie (u == 0 exactly), below (u < 0), above (u > 0), near (no exact tie was found)
    pre: float  # the reference pre-activation u at that unit
    family: str  # single-term or data
    certified: bool = False



def _single_term_layer(m: nn.Module) -> bool:
    """Layers that compute each output from one product per non-zero input element, plus a bias."""
    if isinstance(m, (nn.Linear, BinaryLinear)):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return m.padding_mode == "zeros"
    if isinstance(m, BinaryConv2d):
        return m.padding == 0 or m.pad_value == 0.0
    return False


_FX_LAYERS = ("aten.linear.default", "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default")
Layer = tuple  # (float64 version of the layer: x64 -> y64, the input it saw, the output it gave)


def _as_float64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double()


@contextlib.contextmanager
def _record_layers(model: nn.Module):
    """Each single-term layer call inside the block, as (float64 layer, input, output)."""
    seen: list[Layer] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((_as_float64(mod), args[0], out)))
             for m in model.modules() if _single_term_layer(m)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


class _LayerInterpreter(StepInterpreter):
    """A torch.export graph: its steps, and its dense / convolution calls (zero padding is built into them)."""

    def __init__(self, module: torch.fx.GraphModule, calls: list, layers: list[Layer]) -> None:
        super().__init__(module, calls, keep_graph=False)
        self.layers = layers

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        if n.op == "call_function" and str(n.target) in _FX_LAYERS:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            rest = [a.double() if isinstance(a, torch.Tensor) else a for a in args[1:]]
            self.layers.append((lambda x, f=n.target, rest=rest, kw=kwargs: f(x, *rest, **kw), args[0], value))
        return value


@torch.no_grad()
def certify(model: nn.Module, input_shape: Sequence[int], x: np.ndarray, points: list[CraftedPoint],
             coords: dict[int, int]) -> None:
    """Mark the single-term exact ties that every evaluation order reproduces (see the module docstring)."""
    for p in points:
        if p.role != "tie" or p.family != "single-term" or p.sample not in coords:
            continue
        row = x[p.sample].reshape(-1)
        if np.count_nonzero(row) != 1:
            continue
        k = coords[p.sample]
        value = row[k]
        if not abs(value) >= np.finfo(np.float32).tiny:  # a subnormal input multiplies to 0: no evidence
            continue
        # The tie itself and four other values along the coordinate, in one batch.
        probes = np.repeat(row[None], 5, axis=0)
        probes[1:, k] = (value * np.array([1 - 2.0**-3, 1 + 2.0**-3, 1 - 2.0**-7, 1 + 2.0**-7])).astype(np.float32)
        xt = torch.from_numpy(probes.reshape(-1, *input_shape))
        if isinstance(model, torch.fx.GraphModule):  # its layers are graph ops; its steps comparisons or Steps
            calls, layers = [], []
            with record_steps(model) as hooked:
                _LayerInterpreter(model, calls, layers).run(xt)
            calls += hooked
        else:
            with _record_layers(model) as layers:
                _, calls = forward_recording(model, (xt,), until={(p.site, p.call)})
        call = next((c for c in calls if (c.site, c.call) == (p.site, p.call)), None)
        if call is None:
            continue
        theta = np.float32(call.threshold)
        step_in = call.input.reshape(5, -1)[:, p.unit].numpy()
        if step_in[0] != theta or len(np.unique(step_in)) < 5:  # the unit must follow the coordinate
            continue
        for layer64, inp, out in layers:
            if inp is not xt or tuple(out.shape) != tuple(call.input.shape):
                continue
            if not np.array_equal(out.reshape(5, -1)[:, p.unit].numpy(), step_in):
                continue
            both = torch.from_numpy(np.stack([row, np.zeros_like(row)]).astype(np.float64).reshape(-1, *input_shape))
            o64, b64 = layer64(both).reshape(2, -1)[:, p.unit].tolist()
            product = o64 - b64  # exact: one product in float64
            unfused = np.float32(np.float32(product) + np.float32(b64))
            fused = np.float32(o64)
            if unfused == theta and fused == theta:
                p.certified = True
                break
