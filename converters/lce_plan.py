"""Whether LCE runs a binary layer bit-packed and exactly, and how it pads: TensorFlow's SAME padding, LCE's
``pad_values``, or an explicit pad before the layer; and why not, when it cannot."""

from __future__ import annotations

from dataclasses import dataclass

from .tflite_binary import BinaryLayer


@dataclass(frozen=True)
class LcePlan:
    """Whether LCE runs a layer bit-packed and exactly: ``padding`` "valid", "same" (TF SAME with pad_values)
    or "explicit"; ``note`` how it pads; ``reason`` why not, when it does not."""

    packed: bool
    padding: str = "valid"
    note: str = ""
    reason: str = ""


FLOAT_PLAN = LcePlan(False)


def _tf_same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Padding TensorFlow's SAME adds before and after a spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _lce_padding(layer: BinaryLayer, kernel: tuple[int, int]) -> tuple[str, str]:
    """("valid" | "same" | "explicit" | "", note or reason) for LCE; "" means LCE cannot express it exactly."""
    pad = layer.padding
    if pad is None or not pad.any:
        return "valid", ""
    same = layer.input_hw is not None and (
        (pad.top, pad.bottom) == _tf_same(layer.input_hw[0], kernel[0], layer.stride[0])
        and (pad.left, pad.right) == _tf_same(layer.input_hw[1], kernel[1], layer.stride[1]))
    if pad.value == 1.0 and same:
        return "same", "pad +1: pad_values=1"
    if pad.value == 0.0 and same:
        return "same", "zero pad: pad_values=0, exact but float output"
    if abs(pad.value) == 1.0:
        return "explicit", f"pad {pad.value:+g}: explicit PADV2 (TF SAME pads differently here)"
    if pad.value == 0.0:
        return "", "zero padding of ±1 activations at this stride/size: no exact LCE form (TF SAME pads differently)"
    return "", f"padding ±1 activations with {pad.value:g} has no exact LCE form"


def plan_lce(layer: BinaryLayer) -> LcePlan:
    """Whether LCE can run ``layer`` bit-packed and exactly, and how it pads; or why not."""
    if layer.kind == "dense":
        return LcePlan(True)
    if layer.group != 1:
        depthwise = layer.group == layer.weight.shape[0] and layer.weight.shape[1] == 1
        return LcePlan(False, reason="LCE has no binary depthwise conv" if depthwise else
                       "grouped binary convs run only on LCE's indirect-BGEMM kernel, not its default one")
    # TF's SAME padding of a dilated kernel is that of its span
    span = tuple(d * (int(k) - 1) + 1 for d, k in zip(layer.dilation, layer.weight.shape[2:]))
    mode, note = _lce_padding(layer, span)  # type: ignore[arg-type]
    return LcePlan(True, mode, note) if mode else LcePlan(False, reason=note)
