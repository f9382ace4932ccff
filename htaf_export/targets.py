"""The targets, defined once: name, file suffix, converter, and the runtime stage that finishes the file.

Adding a target is adding one converter module under ``converters/`` whose function has the contract

    convert(capture: Capture, provenance: Mapping[str, str], options: ExportOptions) -> Conversion

and one entry in ``TARGETS`` below. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .contracts import check_one_of
from .errors import BadInput

LCE_KERNEL_CHOICES = ("auto", "default", "indirect-bgemm")
SNN_MODES = ("unrolled", "streaming")
REPORT_SUFFIXES = (".json", ".html")


@dataclass(frozen=True)
class ExportOptions:
    """Target options a user can set; each converter reads the ones that concern it and refuses the rest."""

    portable: bool = False
    snn_mode: str = "unrolled"
    lce_kernel: str = "auto"

    def __post_init__(self) -> None:
        check_one_of("--snn-mode", self.snn_mode, SNN_MODES, BadInput)
        check_one_of("--lce-kernel", self.lce_kernel, LCE_KERNEL_CHOICES, BadInput)

    @property
    def streaming(self) -> bool:
        return self.snn_mode == "streaming"


@dataclass(frozen=True)
class Target:
    """``converter`` and ``finish`` are "module:function" under htaf_export; ``finish`` (optional) is a runtime
    stage run on the converted bytes before they are written (e.g. locating step tensors in a TFLite file)."""

    name: str
    default_suffix: str
    suffix: str
    converter: str
    description: str
    finish: str | None = None

    def function(self, which: str) -> Callable:
        module, _, name = (self.converter if which == "converter" else self.finish or "").partition(":")
        return getattr(importlib.import_module(f"htaf_export.{module}"), name)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("onnx", ".onnx", ".onnx", "converters.onnx:convert",
           "ONNX: htaf step functions, 1-bit packed weights, runs on stock ONNX Runtime"),
    Target("onnx-int8", ".int8.onnx", ".onnx", "converters.onnx_int8:convert",
           "ONNX with binary layers as int8 ops (QLinearConv, MatMulInteger) on stock ONNX Runtime"),
    Target("qonnx", ".qonnx.onnx", ".onnx", "converters.qonnx:convert",
           "QONNX (BipolarQuant, MultiThreshold) for FINN; validated by qonnx's own executor"),
    Target("tflite", ".tflite", ".tflite", "converters.tflite:convert_bitpacked",
           "TFLite with binary layers bit-packed by Larq Compute Engine",
           finish="runtimes.tflite_locate:finish_bitpacked"),
    Target("tflite-float", ".float.tflite", ".tflite", "converters.tflite:convert_float",
           "TFLite with builtin float ops only (stock interpreter)",
           finish="runtimes.tflite_locate:finish_float"),
    Target("tflite-int8", ".int8.tflite", ".tflite", "converters.tflite_int8:convert",
           "TFLite with binary convs as builtin int8 CONV_2D (stock interpreter, XNNPACK)",
           finish="runtimes.tflite_locate:finish_float"),
    Target("nir", ".nir", ".nir", "converters.nir:convert",
           "NIR graph (LIF, Threshold) for neuromorphic simulators and chips; validated by a NIR simulator "
           "and, where it loads the file, snnTorch"),
)}
ARTIFACT_SUFFIXES = tuple(sorted({t.suffix for t in TARGETS.values()}))


def target(name: str) -> Target:
    if name not in TARGETS:
        raise BadInput(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
