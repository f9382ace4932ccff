"""TFLite runtimes: the Larq Compute Engine interpreter (default and indirect-BGEMM kernels) and stock TFLite.

A ``.tflite`` written by htaf-export carries a metadata entry ``htaf_export`` (JSON, string values, the
same keys as the ONNX target's metadata_props) that says, besides the step list:

- ``htaf_export.tflite.io``: for each model input and output, its tensor index, its PyTorch shape and
  its layout in the file (``nhwc`` for 4-D tensors; ``plain`` otherwise);
- ``htaf_export.tflite.observed_steps``: for each step tensor that the file computes, the tensor index
  and how it is stored there: ``float`` (the ±1 or {0,1} values), ``bitpacked`` (LCE's int32 words,
  32 channels a word, bit = 1 meaning −1) or ``presign`` (the float pre-activation y, the step being
  y ≥ 0, or y > 0 for tie gt, exactly as LCE binarizes it); plus the layout;
- ``htaf_export.tflite.unobserved_steps``: steps the file does not compute as a tensor, with the reason.

A runner exposes the observed step tensors by adding them to the subgraph's outputs (nothing else in
the file changes, so the same kernels run), runs one sample at a time (LCE fixes the batch at 1), and
returns every output and observed step in PyTorch layout. ``ArtifactInfo.steps`` lists only the
observed steps, so validation compares exactly what the file computes.

TensorFlow is imported only here and in the TFLite converter, never by the core.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..capture import StepNode
from ..errors import BadInput
from . import ArtifactInfo

METADATA_NAME = "htaf_export"
IO_KEY = "htaf_export.tflite.io"
OBSERVED_KEY = "htaf_export.tflite.observed_steps"
UNOBSERVED_KEY = "htaf_export.tflite.unobserved_steps"
KERNEL_KEY = "htaf_export.tflite.lce_kernel"
KERNEL_MS_KEY = "htaf_export.tflite.lce_kernel_ms"
STEP_LAYERS_KEY = "htaf_export.tflite.step_layers"
LCE_OPS = ("LceQuantize", "LceDequantize", "LceBconv2d", "LceBMaxPool2d")
LCE_KERNELS = {"default": {}, "indirect_bgemm": {"use_indirect_bgemm": True}}


@contextlib.contextmanager
def quiet_stderr():
    """Silence C++ logging written straight to file descriptor 2 (TFLite prints an INFO line per delegate)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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


# ---- the flatbuffer ----------------------------------------------------------------------------


def read_model(data: bytes):
    """The file as TFLite's object API (``ModelT``)."""
    try:
        return schema().ModelT.InitFromPackedBuf(bytearray(data), 0)
    except Exception as e:  # noqa: BLE001 - a corrupt flatbuffer raises anything from struct to IndexError
        raise BadInput(f"not a readable .tflite flatbuffer ({type(e).__name__})") from None


def write_model(model) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def op_names(model) -> list[str]:
    """Each operator of subgraph 0 by name, custom ops (``LceBconv2d``) by their custom code."""
    sch = schema()
    builtin = {v: k for k, v in vars(sch.BuiltinOperator).items() if not k.startswith("_")}
    names = []
    for code in model.operatorCodes:
        number = max(code.builtinCode, code.deprecatedBuiltinCode)
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
        names.append(custom if number == sch.BuiltinOperator.CUSTOM else builtin[number])
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
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    return {}


def with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The file with ``metadata`` stored as the JSON entry ``htaf_export`` (replacing an earlier one)."""
    sch = schema()
    model = read_model(data)
    buffer = sch.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = sch.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    kept = [m for m in (model.metadata or []) if (m.name.decode() if isinstance(m.name, bytes) else m.name) != METADATA_NAME]
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


def unpack_bits(words: np.ndarray, channels: int) -> np.ndarray:
    """LCE's bit-packed int32 activations (…, ⌈C/32⌉) → ±1 float32 (…, C); bit i of word w is channel 32w+i."""
    as_bytes = np.ascontiguousarray(words.astype("<i4")).view(np.uint8).reshape(*words.shape, 4)
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little").reshape(*words.shape[:-1], -1)[..., :channels]
    return np.where(bits == 1, np.float32(-1.0), np.float32(1.0))


def to_torch_layout(array: np.ndarray, layout: str, shape: list[int]) -> np.ndarray:
    """A tensor in the file's layout → PyTorch layout. ``shape`` is the PyTorch shape without the batch."""
    n = array.shape[0]
    if layout in ("nhwc", "nhwc_flat"):
        array = array.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(array.reshape(n, *shape))


def decode(array: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """One stored tensor → the PyTorch tensor it holds, as described by an io or observed-step entry."""
    encoding = spec.get("encoding", "float")
    if encoding == "bitpacked":
        array = unpack_bits(array, int(spec["channels"]))
    elif encoding == "presign":
        fired = array > 0 if spec.get("tie") == "gt" else array >= 0
        array = fired.astype(np.float32) if spec.get("levels") == "01" else np.where(fired, np.float32(1), np.float32(-1))
    return to_torch_layout(array.astype(np.float32, copy=False), spec["layout"], spec["shape"])


def encode_input(x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """A PyTorch-layout input → the file's layout."""
    x = np.asarray(x, dtype=np.float32)
    if spec["layout"] == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)


# ---- artifact info -----------------------------------------------------------------------------


@dataclass
class TfliteLayout:
    """What the metadata says about where each named tensor lives in the file."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    unobserved: list[dict[str, Any]]

    @classmethod
    def of(cls, metadata: dict[str, str]) -> "TfliteLayout":
        io = json.loads(metadata[IO_KEY])
        return cls(io["inputs"], io["outputs"], json.loads(metadata.get(OBSERVED_KEY, "[]")),
                   json.loads(metadata.get(UNOBSERVED_KEY, "[]")))


def read_tflite_artifact(path: Path) -> ArtifactInfo:
    model = read_model(Path(path).read_bytes())
    try:
        meta = read_metadata(model)
    except (ValueError, UnicodeDecodeError):
        raise BadInput(f"artifact {path} has unreadable htaf_export metadata") from None
    if "htaf_export.steps" not in meta or IO_KEY not in meta:
        raise BadInput(f"artifact {path} was not written by htaf-export (no htaf_export metadata)")
    try:
        layout = TfliteLayout.of(meta)
    except (ValueError, TypeError, KeyError):
        raise BadInput(f"artifact {path} has unreadable htaf_export metadata") from None
    observed = {s["tensor"] for s in layout.steps}
    try:
        steps = [StepNode(**s) for s in json.loads(meta["htaf_export.steps"]) if s["tensor"] in observed]
        layers = json.loads(meta.get(STEP_LAYERS_KEY, "{}"))
    except (ValueError, TypeError, KeyError):
        raise BadInput(f"artifact {path} has unreadable htaf_export metadata") from None
    return ArtifactInfo(Path(path), "tflite", [i["name"] for i in layout.inputs], [o["name"] for o in layout.outputs],
                        steps, meta, layers)


# ---- runners -----------------------------------------------------------------------------------


class _TfliteRunner(abc.ABC):
    """Shared part: the file with observed steps as extra outputs, run one sample at a time."""

    name: str
    device = "cpu"

    def __init__(self, info: ArtifactInfo) -> None:
        self.layout = TfliteLayout.of(info.metadata)
        self.specs = self.layout.outputs + self.layout.steps
        self.indices = [int(s["index"]) for s in self.specs]
        self.data = with_outputs(Path(info.path).read_bytes(), self.indices)
        # inputs in the subgraph's order, which is how the interpreters take them
        order = [int(i) for i in read_model(self.data).subgraphs[0].inputs]
        self.inputs = sorted(self.layout.inputs, key=lambda spec: order.index(int(spec["index"])))

    @abc.abstractmethod
    def _invoke(self, sample: list[np.ndarray]) -> dict[int, np.ndarray]:
        """Run one sample; return the requested tensors by index (each interpreter does it its own way)."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [encode_input(inputs[spec["name"]], spec) for spec in self.inputs]
        n = len(arrays[0])
        per_sample = [self._invoke([a[k:k + 1] for a in arrays]) for k in range(n)]
        result = {}
        for spec in self.specs:
            stacked = np.concatenate([s[int(spec["index"])] for s in per_sample])
            result[spec["tensor"] if "tensor" in spec else spec["name"]] = decode(stacked, spec)
        return result


class LceRunner(_TfliteRunner):
    """Larq Compute Engine's interpreter (runs LCE custom ops and builtins), with one of its bconv kernels."""

    def __init__(self, info: ArtifactInfo, kernel: str = "default", threads: int = 1) -> None:
        super().__init__(info)
        from larq_compute_engine.tflite.python.interpreter import Interpreter

        self.name = f"lce-{kernel.replace('_', '-')}"
        try:
            self.interpreter = Interpreter(self.data, num_threads=threads, **LCE_KERNELS[kernel])
        except Exception as e:  # noqa: BLE001 - the wrapper raises RuntimeError and others
            raise BadInput(f"the LCE interpreter cannot load {info.path}: {str(e).splitlines()[0][:200]}") from None
        self.outputs = [int(i) for i in read_model(self.data).subgraphs[0].outputs]

    def _invoke(self, sample: list[np.ndarray]) -> dict[int, np.ndarray]:
        values = self.interpreter.interpreter.predict(sample)
        return dict(zip(self.outputs, values))


class StockTfliteRunner(_TfliteRunner):
    """TensorFlow's own TFLite interpreter (builtin ops only)."""

    def __init__(self, info: ArtifactInfo, threads: int = 1) -> None:
        super().__init__(info)
        tf = tensorflow()
        self.name = "tflite"
        try:
            with quiet_stderr():
                self.interpreter = tf.lite.Interpreter(model_content=self.data, num_threads=threads)
                self.interpreter.allocate_tensors()
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"the TFLite interpreter cannot load {info.path}: {str(e).splitlines()[0][:200]}") from None
    def _invoke(self, sample: list[np.ndarray]) -> dict[int, np.ndarray]:
        for index, x in zip((int(spec["index"]) for spec in self.inputs), sample):
            self.interpreter.set_tensor(index, x)
        self.interpreter.invoke()
        return {i: self.interpreter.get_tensor(i) for i in self.indices}


def uses_lce(data: bytes) -> bool:
    return any(op in LCE_OPS for op in op_names(read_model(data)))


def tflite_runners(info: ArtifactInfo, device: str = "all") -> list[_TfliteRunner]:
    """CPU only. The LCE interpreter with both kernels for the bit-packed target (and any file with LCE ops);
    the stock TFLite interpreter for every file without LCE ops."""
    if device == "cuda":
        return []
    lce = uses_lce(Path(info.path).read_bytes())
    runners: list[_TfliteRunner] = []
    if lce or info.metadata.get("htaf_export.target") == "tflite":
        runners += [LceRunner(info, kernel) for kernel in LCE_KERNELS]
    if not lce:
        runners.append(StockTfliteRunner(info))
    return runners
