"""What follows a binary layer, evaluated exactly: the per-channel ops after its integer sums.

With ±1 inputs and ±1 weights a layer's pre-activation v is an integer in [−K, K]. The per-channel ops
after it (bias, scale, batch norm, add/sub/mul/div by constants) are either followed by a step — then
``integer_thresholds`` evaluates them in PyTorch, with the very float32 operations the reference runs, on
every integer v, and finds per channel a rule "fires iff flip·v ≥ T" — or they are not, and
``compose_affine`` writes them as one y = scale·v + shift. See ``tflite_binary`` for how both are used.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from htaf_export.passes.util import attr, const_array, is_step

AFFINE = ("Add", "Sub", "Mul", "Div", "BatchNormalization")
TORCH_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}




def _per_channel(array: np.ndarray, rank: int, channels: int) -> bool:
    """Whether a constant broadcast against [N, C, ...] (rank ``rank``) varies along C only."""
    if array.ndim > rank:
        return False
    shape = (1,) * (rank - array.ndim) + array.shape
    return all(d == 1 for i, d in enumerate(shape) if i != 1) and shape[1] in (1, channels)


def _chain_member(node: ir.Node, index: int, channels: int, rank: int) -> bool:
    if node.domain != "" or node.op_type not in AFFINE:
        return False
    if node.op_type == "BatchNormalization":
        params = [const_array(v) for v in node.inputs[1:5]]
        return index == 0 and len(node.outputs) == 1 and all(p is not None and p.size == channels for p in params)
    if node.op_type == "Div" and index == 1:  # c / x is not affine in x
        return False
    other = const_array(node.inputs[1 - index])
    return other is not None and _per_channel(other, rank, channels)


def _channel_vector(array: np.ndarray, rank: int, channels: int) -> np.ndarray:
    shape = (1,) * (rank - array.ndim) + array.shape
    return np.broadcast_to(array.reshape(shape).reshape(-1), (channels,)).astype(np.float64)


def compose_affine(chain: list[tuple[ir.Node, int]], bias: np.ndarray | None, channels: int, rank: int,
                   weight_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The chain after the conv (and the conv's bias and weight scale) as one per-channel y = scale·v + shift,
    v the integer ±1 sum (float64, rounded once)."""
    scale = np.ones(channels) if weight_scale is None else weight_scale.astype(np.float64)
    shift = np.zeros(channels) if bias is None else bias.astype(np.float64)
    for node, index in chain:
        if node.op_type == "BatchNormalization":
            gamma, beta, mean, var = (const_array(v).astype(np.float64) for v in node.inputs[1:5])  # type: ignore[union-attr]
            a = gamma / np.sqrt(var + float(np.float32(attr(node, "epsilon", 1e-5))))
            scale, shift = scale * a, (shift - mean) * a + beta
            continue
        c = _channel_vector(const_array(node.inputs[1 - index]), rank, channels)  # type: ignore[arg-type]
        if node.op_type == "Add":
            shift = shift + c
        elif node.op_type == "Mul":
            scale, shift = scale * c, shift * c
        elif node.op_type == "Div":
            scale, shift = scale / c, shift / c
        elif index == 0:  # x − c
            shift = shift - c
        else:  # c − x
            scale, shift = -scale, c - shift
    return scale.astype(np.float32), shift.astype(np.float32)


def follow_chain(value: ir.Value, channels: int, rank: int) -> tuple[list[tuple[ir.Node, int]], ir.Node | None]:
    """Per-channel affine nodes after ``value`` (each the only use of its input) with the input index the
    chain enters by, and the step they end in (None if they end in anything else)."""
    chain: list[tuple[ir.Node, int]] = []
    while not value.is_graph_output():
        uses = list(value.uses())
        if len(uses) != 1:
            break
        node, index = uses[0].node, uses[0].idx
        if is_step(node) and index == 0:
            threshold = const_array(node.inputs[1])
            if threshold is not None and _per_channel(threshold, rank, channels):
                return chain, node
            break
        if not _chain_member(node, index, channels, rank):
            break
        chain.append((node, index))
        value = node.outputs[0]
    return chain, None


def _apply(node: ir.Node, x: torch.Tensor, index: int) -> torch.Tensor:
    """One chain node on a torch tensor, with the same float32 operation the reference module runs."""
    if node.op_type == "BatchNormalization":
        gamma, beta, mean, var = (torch.from_numpy(np.array(const_array(v), dtype=np.float32)) for v in node.inputs[1:5])
        return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, float(attr(node, "epsilon", 1e-5)))
    other = torch.from_numpy(np.array(const_array(node.inputs[1 - index]), dtype=np.float32))
    a, b = (x, other) if index == 0 else (other, x)
    return TORCH_BINARY[node.op_type](a, b)


def integer_thresholds(chain: list[tuple[ir.Node, int]], step: ir.Node, bias: np.ndarray | None, fan_in: int,
                       channels: int, rank: int, weight_scale: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray] | str:
    """Per-channel (flip, T) with "fires iff flip·v ≥ T" for every integer v in [−K, K], or why there is none."""
    v = torch.arange(-fan_in, fan_in + 1, dtype=torch.float32)
    spatial = [1] * (rank - 2)
    x = v.reshape(-1, 1, *spatial).expand(-1, channels, *spatial).contiguous()
    if weight_scale is not None:
        x = x * torch.from_numpy(weight_scale).reshape(1, -1, *spatial)
    if bias is not None:
        x = x + torch.from_numpy(bias.astype(np.float32)).reshape(1, -1, *spatial)
    for node, index in chain:
        x = _apply(node, x, index)
    theta = torch.from_numpy(np.array(const_array(step.inputs[1]), dtype=np.float32))
    fired = ((x >= theta) if step.attributes["tie"].as_string() == "ge" else (x > theta))
    fired = fired.reshape(len(v), channels).numpy()
    rising = np.all(fired[1:] >= fired[:-1], axis=0)
    falling = np.all(fired[1:] <= fired[:-1], axis=0)
    if not np.all(rising | falling):
        return f"the ops between the conv and its step are not monotone (channel {int(np.argmin(rising | falling))})"
    ints = v.numpy().astype(np.int64)
    flip = np.where(rising, 1.0, -1.0).astype(np.float32)
    threshold = np.full(channels, fan_in + 1, dtype=np.int64)  # never fires
    for c in np.flatnonzero(fired.any(axis=0)):
        f = fired[:, c]
        # rising: fires iff v ≥ first firing v; falling: fires iff v ≤ last firing v ⇔ −v ≥ −(last firing v)
        threshold[c] = ints[np.argmax(f)] if rising[c] else -ints[len(f) - 1 - np.argmax(f[::-1])]
    return flip, threshold.astype(np.float32)
