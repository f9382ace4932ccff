"""The .tflite file itself: TensorFlow import, the flatbuffer, its metadata, and where named tensors live.

A ``.tflite`` written by htaf-export carries a metadata entry ``htaf_export`` (JSON, string values, the
same keys as the ONNX target's metadata_props, see ``htaf_export.metadata``) that says, besides the steps:

- ``TFLITE_IO``: for each model input and output an :class:`IoSlot`: its tensor index, its PyTorch
  shape and its layout in the file (``nhwc`` for 4-D tensors; ``plain`` otherwise);
- ``TFLITE_OBSERVED``: for each step tensor that the file computes a :class:`StepSlot`: the tensor index
  and how it is stored there: ``float`` (the ±1 or {0,1} values), ``bitpacked`` (LCE's int32 words,
  32 channels a word, bit = 1 meaning −1) or ``presign`` (the float pre-activation y, the step being
  y ≥ 0, or y > 0 for tie gt, exactly as LCE binarizes it); plus the layout;
- ``TFLITE_UNOBSERVED``: steps the file does not compute as a tensor, with the reason.

Used by the TFLite converter (writing) and the TFLite runtimes (reading); imports TensorFlow only when
a function needs it, never at import time.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from typing import Any, ContextManager, Mapping

import numpy as np

from . import metadata as md
from .errors import BadInput
from .files import silenced

METADATA_NAME = "htaf_export"
LAYOUTS = ("plain", "nhwc", "nhwc_flat", "pixel")
ENCODINGS = ("float", "bitpacked", "presign")
# What the flatbuffers reader raises on bytes that are not a TFLite model.
FLATBUFFER_ERRORS = (struct.error, IndexError, ValueError, TypeError, AttributeError, UnicodeDecodeError)


def quiet_stderr() -> ContextManager[None]:
    """Silence C++ logging written straight to file descriptor 2 (TFLite prints an INFO line per delegate)."""
    return silenced(2)


def tensorflow():
    """Import TensorFlow with Keras 2 (tf_keras), which larq needs; quiet its C++ logging."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with quiet_stderr():  # TensorFlow's C++ start-up chatter (CUDA plugins, XLA) bypasses its log level
            import tensorflow as tf
    except ImportError:
        raise BadInput("TFLite targets need TensorFlow: pip install 'htaf-export[tflite]'") from None
    return tf


def schema():
    tensorflow()
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


# ---- typed slots ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IoSlot:
    """Where a model input or output lives in the file."""

    name: str
    index: int
    layout: str
    shape: tuple[int, ...]
    encoding: str = "float"
    keras: str = ""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS or self.encoding not in ENCODINGS:
            raise ValueError(f"tensor {self.name!r}: bad layout {self.layout!r} or encoding {self.encoding!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IoSlot":
        return cls(str(d["name"]), int(d["index"]), str(d["layout"]), tuple(int(x) for x in d["shape"]),
                   str(d.get("encoding", "float")), str(d.get("keras", "")))


@dataclass(frozen=True)
class StepForm:
    """How the converter laid out one step tensor: layout, PyTorch and stored shapes, levels, tie, Keras name."""

    tensor: str
    layout: str
    shape: tuple[int, ...]
    stored: tuple[int, ...]
    levels: str
    tie: str
    keras: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape), "stored": list(self.stored)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepForm":
        return cls(str(d["tensor"]), str(d["layout"]), tuple(int(x) for x in d["shape"]),
                   tuple(int(x) for x in d["stored"]), str(d["levels"]), str(d["tie"]), str(d.get("keras", "")))


@dataclass(frozen=True)
class StepSlot:
    """A step tensor the file computes: its index and encoding, and what ``decode`` needs."""

    tensor: str
    index: int
    encoding: str
    layout: str
    shape: tuple[int, ...]
    levels: str
    tie: str
    channels: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepSlot":
        return cls(str(d["tensor"]), int(d["index"]), str(d["encoding"]), str(d["layout"]),
                   tuple(int(x) for x in d["shape"]), str(d["levels"]), str(d["tie"]), int(d["channels"]))


@dataclass(frozen=True)
class TfliteLayout:
    """What the metadata says about where each named tensor lives in the file."""

    inputs: tuple[IoSlot, ...]
    outputs: tuple[IoSlot, ...]
    steps: tuple[StepSlot, ...]
    unobserved: tuple[Mapping[str, str], ...]

    @classmethod
    def of(cls, metadata: Mapping[str, str]) -> "TfliteLayout":
        io = json.loads(metadata[md.TFLITE_IO])
        return cls(tuple(IoSlot.from_dict(d) for d in io["inputs"]), tuple(IoSlot.from_dict(d) for d in io["outputs"]),
                   tuple(StepSlot.from_dict(d) for d in json.loads(metadata.get(md.TFLITE_OBSERVED, "[]"))),
                   tuple(json.loads(metadata.get(md.TFLITE_UNOBSERVED, "[]"))))


# ---- the flatbuffer ----------------------------------------------------------------------------


def read_model(data: bytes):
    """The file as TFLite's object API (``ModelT``)."""
    try:
        return schema().ModelT.InitFromPackedBuf(bytearray(data), 0)
    except FLATBUFFER_ERRORS:
        raise BadInput("not a readable .tflite flatbuffer (truncated, or another kind of file)") from None


def write_model(model) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def op_names(model) -> list[str]:
    """Each operator of subgraph 0 by name, custom ops (``LceBconv2d``) by their custom code."""
    sch = schema()
    builtin = {v: k for k, v in vars(sch.BuiltinOperator).items() if not k.startswith("_")}
    names = []
    for code in model.operatorCodes:
        number = max(code.builtinCode, code.deprecatedBuiltinCode)
        names.append(text(code.customCode) if number == sch.BuiltinOperator.CUSTOM else builtin[number])
    return [names[op.opcodeIndex] for op in model.subgraphs[0].operators]


def constant_bytes(model, tensor_index: int) -> int:
    """Bytes of a constant tensor's buffer (0 for tensors computed at run time)."""
    tensor = model.subgraphs[0].tensors[tensor_index]
    data = model.buffers[tensor.buffer].data
    return 0 if data is None else len(data)


def is_constant(model, tensor_index: int) -> bool:
    return constant_bytes(model, tensor_index) > 0


def read_metadata(model) -> dict[str, str]:
    for entry in model.metadata or []:
        if text(entry.name) == METADATA_NAME:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    return {}


def with_metadata(data: bytes, metadata: Mapping[str, str]) -> bytes:
    """The file with ``metadata`` stored as the JSON entry ``htaf_export`` (replacing an earlier one)."""
    sch = schema()
    model = read_model(data)
    kept = [m for m in (model.metadata or []) if text(m.name) != METADATA_NAME]
    used = {m.buffer for m in kept}
    # drop the buffer of an earlier entry, so rewriting the metadata never grows the file
    old = [m.buffer for m in (model.metadata or []) if text(m.name) == METADATA_NAME]
    if old and old[-1] == len(model.buffers) - 1 and old[-1] not in used:
        model.buffers.pop()
    buffer = sch.BufferT()
    buffer.data = np.frombuffer(md.compact(dict(metadata)).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = sch.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = kept + [entry]
    return write_model(model)


def with_outputs(data: bytes, extra: list[int]) -> bytes:
    """The file with tensors ``extra`` appended to subgraph 0's outputs (so an interpreter keeps them)."""
    model = read_model(data)
    graph = model.subgraphs[0]
    present = [int(i) for i in graph.outputs]
    graph.outputs = np.array(present + [i for i in extra if i not in present], dtype=np.int32)
    return write_model(model)


# ---- decoding tensors into PyTorch layout ------------------------------------------------------


# Each byte value → its 8 channels as ±1 (bit set = −1), low bit first: one gather unpacks a tensor.
_SIGNS_OF_BYTE = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1,
                          np.float32(-1.0), np.float32(1.0))


def unpack_bits(words: np.ndarray, channels: int) -> np.ndarray:
    """LCE's bit-packed int32 activations (…, ⌈C/32⌉) → ±1 float32 (…, C); bit i of word w is channel 32w+i."""
    as_bytes = np.ascontiguousarray(words.astype("<i4", copy=False)).view(np.uint8)
    signs = _SIGNS_OF_BYTE[as_bytes].reshape(*words.shape[:-1], -1)
    return signs if signs.shape[-1] == channels else signs[..., :channels]


def to_torch_layout(array: np.ndarray, layout: str, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """A tensor in the file's layout → PyTorch layout. ``shape`` is the PyTorch shape without the batch."""
    n = array.shape[0]
    if layout in ("nhwc", "nhwc_flat"):
        array = array.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(array.reshape(n, *shape))


def decode(array: np.ndarray, slot: IoSlot | StepSlot) -> np.ndarray:
    """One stored tensor → the PyTorch tensor it holds."""
    if slot.encoding == "bitpacked":
        array = unpack_bits(array, int(slot.channels))  # type: ignore[union-attr]
    elif slot.encoding == "presign":
        assert isinstance(slot, StepSlot)
        fired = array > 0 if slot.tie == "gt" else array >= 0
        array = fired.astype(np.float32) if slot.levels == "01" else np.where(fired, np.float32(1), np.float32(-1))
    return to_torch_layout(array.astype(np.float32, copy=False), slot.layout, slot.shape)


def encode_input(x: np.ndarray, layout: str) -> np.ndarray:
    """A PyTorch-layout input → the file's layout."""
    x = np.asarray(x, dtype=np.float32)
    if layout == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)
