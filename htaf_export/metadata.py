"""Keys of the provenance every artifact carries (ONNX ``metadata_props``, the TFLite ``htaf_export`` entry).

Values are strings; structured values are JSON. Readers and writers use these names, never literals.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

VERSION = "htaf_export.version"
TARGET = "htaf_export.target"
SOURCE_SHA256 = "htaf_export.source_sha256"
SOURCE_FORMAT = "htaf_export.source_format"
FAMILY = "htaf_export.family"
ARCH = "htaf_export.arch"
INPUT_SHAPE = "htaf_export.input_shape"
SNN_MODE = "htaf_export.snn_mode"
TIE = "htaf_export.tie"
STEPS = "htaf_export.steps"
# ONNX target
ONNX_MODE = "htaf_export.mode"
BINARY_WEIGHTS = "htaf_export.binary_weights"
CHANNELS_LAST_STEPS = "htaf_export.channels_last_steps"  # step tensors an onnx-int8 file stores as NHWC
# TFLite targets
TFLITE_IO = "htaf_export.tflite.io"
TFLITE_STEP_SLOTS = "htaf_export.tflite.step_slots"
TFLITE_OBSERVED = "htaf_export.tflite.observed_steps"
TFLITE_UNOBSERVED = "htaf_export.tflite.unobserved_steps"
TFLITE_STEP_LAYERS = "htaf_export.tflite.step_layers"
TFLITE_LCE_KERNEL = "htaf_export.tflite.lce_kernel"
# NIR target (JSON values in the graph's metadata)
NIR_DT = "htaf_export.nir.dt"
NIR_TIME_STEPS = "htaf_export.nir.time_steps"
NIR_READOUT = "htaf_export.nir.readout"
NIR_SPIKES = "htaf_export.nir.spikes"
NIR_INPUTS = "htaf_export.nir.inputs"
NIR_OUTPUTS = "htaf_export.nir.outputs"
NIR_TIME_INPUTS = "htaf_export.nir.time_inputs"  # inputs fed one time step at a time: {name: per-sample axis}


def encode(values: Mapping[str, Any]) -> dict[str, str]:
    """Metadata values as stored: strings as they are, anything else as JSON with sorted keys."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()}


def compact(value: Any) -> str:
    """JSON without spaces, for the larger entries of a TFLite file."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
