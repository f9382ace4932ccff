"""ONNX Runtime: the CPU provider always, the CUDA provider where a GPU and its provider exist."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .. import metadata as md
from ..contracts import StepSpec
from ..errors import BadInput
from ..ops import lower_steps
from ..passes.util import INTEGER_WEIGHT_INPUTS, WEIGHT_INPUTS, layer_of
from . import ArtifactInfo, read_steps


def read_onnx_artifact(path: Path) -> ArtifactInfo:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise BadInput(f"artifact {path} is not a readable ONNX file: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if md.STEPS not in meta:
        raise BadInput(f"artifact {path} was not written by htaf-export (no htaf_export metadata)")
    steps = read_steps(path, meta)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = tuple(i.name for i in proto.graph.input if i.name not in initializers)
    return ArtifactInfo(path, "onnx", inputs, tuple(o.name for o in proto.graph.output), tuple(steps), meta,
                        feeding_layers(proto.graph, [s.tensor for s in steps]))


def onnxruntime_module():
    """The onnxruntime module (from the `cpu` or the `gpu` extra; they are alternatives)."""
    try:
        import onnxruntime
    except ImportError:
        raise BadInput("ONNX Runtime is not installed: pip install 'htaf-export[cpu]' "
                       "(or 'htaf-export[gpu]' on a CUDA machine)") from None
    return onnxruntime


def _ort_errors() -> tuple[type[Exception], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidGraph, state.InvalidProtobuf, state.InvalidArgument, state.NotImplemented,
            state.RuntimeException)


def _weight_of(node: onnx.NodeProto) -> str | None:
    """The weight input of a layer node, float or integer (onnx-int8)."""
    index = WEIGHT_INPUTS.get(node.op_type, INTEGER_WEIGHT_INPUTS.get(node.op_type)) if node.domain == "" else None
    return node.input[index] if index is not None and len(node.input) > index else None


def feeding_layers(graph: onnx.GraphProto, tensors: list[str], depth: int = 8) -> dict[str, str]:
    """For each step tensor, the weighted layer nearest upstream (breadth first), named after its weight."""
    producer = {o: n for n in graph.node for o in n.output}
    constants = {i.name for i in graph.initializer}
    found: dict[str, str] = {}
    for tensor in tensors:
        node = producer.get(tensor)
        frontier = [i for i in node.input[:1]] if node is not None else []
        seen: set[str] = set()
        for _ in range(depth):
            nxt: list[str] = []
            for value in frontier:
                if value in seen or value in constants or value not in producer:
                    continue
                seen.add(value)
                n = producer[value]
                weight = _weight_of(n)
                if weight is not None:
                    layer = layer_of(weight)
                    if layer:
                        found[tensor] = layer
                        break
                nxt += list(n.input)
            if tensor in found or not nxt:
                break
            frontier = nxt
    return found


def cuda_unavailable() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or None when it can."""
    ort = onnxruntime_module()

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


def _with_step_outputs(path: Path, steps: Sequence[StepSpec]) -> bytes:
    """The model with every step tensor also exposed as a graph output, so it can be compared."""
    proto = onnx.load(str(path))
    present = {o.name for o in proto.graph.output}
    for s in steps:
        if s.tensor not in present:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(s.tensor))
    return proto.SerializeToString()


class OnnxRuntimeRunner:
    def __init__(self, info: ArtifactInfo, provider: str, threads: int = 0) -> None:
        ort = onnxruntime_module()

        self.info = info
        self.provider = provider
        self.device = "cuda" if provider.startswith("CUDA") else "cpu"
        self.name = f"onnxruntime-{self.device}"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(_with_step_outputs(info.path, info.steps), opts, providers=[provider])
        except _ort_errors() as e:
            raise BadInput(f"ONNX Runtime cannot load {info.path}: {str(e).splitlines()[0][:200]}") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inference_seconds = 0.0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        started = time.perf_counter()
        values = self.session.run(self.outputs, feed)
        self.inference_seconds += time.perf_counter() - started
        return decode_steps(dict(zip(self.outputs, values)), self.info.steps, channels_last(self.info.metadata))


def channels_last(metadata: Mapping[str, str]) -> frozenset[str]:
    """The step tensors a file stores channels-last (NHWC): onnx-int8 between im2col products."""
    try:
        return frozenset(json.loads(metadata.get(md.CHANNELS_LAST_STEPS, "[]")))
    except ValueError:
        raise BadInput(f"unreadable {md.CHANNELS_LAST_STEPS} metadata") from None


def decode_steps(values: dict[str, np.ndarray], steps: Sequence[StepSpec], nhwc: frozenset[str] = frozenset()
                 ) -> dict[str, np.ndarray]:
    """Step tensors an integer graph keeps as bools ("fired") as the step's float values, in NCHW."""
    for s in steps:
        if s.tensor in nhwc and s.tensor in values:
            values[s.tensor] = values[s.tensor].transpose(0, 3, 1, 2)
        fired = values.get(s.tensor)
        if fired is not None and fired.dtype == np.bool_:
            values[s.tensor] = (fired.astype(np.float32) if s.levels == "01"
                                else np.where(fired, np.float32(1.0), np.float32(-1.0)))
    return values


def onnx_runners(info: ArtifactInfo, device: str = "all", threads: int = 0) -> list[OnnxRuntimeRunner]:
    ort = onnxruntime_module()

    available = ort.get_available_providers()
    wanted = []
    if device in ("cpu", "all"):
        wanted.append("CPUExecutionProvider")
    if device in ("cuda", "all") and "CUDAExecutionProvider" in available:
        wanted.append("CUDAExecutionProvider")
    return [OnnxRuntimeRunner(info, p, threads) for p in wanted]


def ir_session(model: ir.Model, tensors: Sequence[str]):
    """``run({input: array}) -> {tensor: array}``: ONNX Runtime on an IR model itself (steps lowered to standard
    ops, each with its own tie rule), returning ``tensors``. An oracle independent of any converter."""
    ort = onnxruntime_module()

    proto = lower_steps(ir.to_proto(model))
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in present)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = list(tensors)

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, inputs)))

    return run


@dataclass
class GraphSteps:
    """The steps of a model whose own run cannot record them (a TorchScript module exposes no intermediate tensors):
    its captured graph, steps lowered to standard ops, run in ONNX Runtime. ``steps`` holds, per step call, (site,
    call, output tensor, input tensor, threshold); ``outputs``, the graph's outputs (the model's, as captured).
    Picklable (workers rebuild the session)."""

    model: bytes
    input_names: tuple[str, ...]
    steps: tuple[tuple[str, int, str, str, np.ndarray], ...]
    outputs: tuple[str, ...] = ()
    _session: object = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None}

    def run(self, inputs: Sequence[np.ndarray]) -> tuple[list[tuple[str, int, np.ndarray, np.ndarray]],
                                                          dict[str, np.ndarray]]:
        """(site, call, step output, pre-activation = step input − threshold) of every step call, in graph order;
        and the graph's outputs by name."""
        if self._session is None:
            ort = onnxruntime_module()
            import torch

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = torch.get_num_threads()  # as many as the reference beside it (a worker: 1)
            self._session = ort.InferenceSession(self.model, opts, providers=["CPUExecutionProvider"])
        names = list(dict.fromkeys([n for _, _, out, inp, _ in self.steps for n in (out, inp)] + list(self.outputs)))
        feed = {name: np.ascontiguousarray(x, dtype=np.float32) for name, x in zip(self.input_names, inputs)}
        values = dict(zip(names, self._session.run(names, feed)))  # type: ignore[attr-defined]
        steps = [(site, call, values[out], (values[inp] - theta).astype(np.float32))
                 for site, call, out, inp, theta in self.steps]
        return steps, {name: values[name] for name in self.outputs}


def graph_steps(model: ir.Model, input_names: Sequence[str], steps: Sequence[StepSpec],
                as_named: Sequence[StepSpec] | None = None) -> GraphSteps | None:
    """``GraphSteps`` of a captured IR whose step nodes write ``steps``' tensors. ``as_named``: the artifact's
    steps, which a second capture of a TorchScript module may name otherwise (its scopes are gone once it has
    been exported): matched by position, op and tie rule; None when they do not match."""
    if as_named is not None:
        if len(as_named) != len(steps) or any((a.op, a.tie) != (b.op, b.tie) for a, b in zip(as_named, steps)):
            return None
        rename = {b.tensor: a for a, b in zip(as_named, steps)}
        steps = [StepSpec(b.tensor, rename[b.tensor].site, b.op, b.tie, rename[b.tensor].call) for b in steps]
    from ..ops import HTAF_DOMAIN

    found = []
    by_tensor = {s.tensor: s for s in steps}
    for node in model.graph:
        spec = by_tensor.get(node.outputs[0].name) if node.domain == HTAF_DOMAIN and node.outputs else None
        theta = node.inputs[1].const_value if spec is not None else None
        if spec is not None and theta is not None:
            found.append((spec.site, spec.call, spec.tensor, node.inputs[0].name, theta.numpy().astype(np.float32)))
    proto = lower_steps(ir.to_proto(model))
    present = {o.name for o in proto.graph.output}
    wanted = [n for _, _, out, inp, _ in found for n in (out, inp)]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(wanted) if t not in present)
    return GraphSteps(proto.SerializeToString(), tuple(input_names), tuple(found), tuple(sorted(present)))
