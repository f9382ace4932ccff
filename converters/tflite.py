"""TFLite targets: ``tflite`` (binary layers bit-packed by Larq Compute Engine) and ``tflite-float`` (builtin ops).

    IR ─copy─▶ fuse binary layers (tflite_binary) ─▶ fold the other batch norms into step thresholds
       ─▶ Keras model (keras_builder) ─▶ LCE converter | TFLite converter ─▶ locate step tensors
       ─▶ (bit-packed: time both LCE kernels) ─▶ metadata ─▶ .tflite

A binary layer is exact by construction (integer thresholds, see tflite_binary); where LCE cannot
express one exactly it runs as a float conv in the same file, and the summary says why. Step tensors
are located in the converted file by running it on probe inputs against the Keras model, so that
validation can read them back (bit-packed ones included); a step the file does not hold as a tensor
is reported as not observable rather than guessed.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import fold_constants

from htaf_export.capture import Capture
from htaf_export.errors import BadInput, UnsupportedLayer
from htaf_export.passes import fold_batchnorm_into_steps
from htaf_export.runtimes import tflite as rt

from .keras_builder import Built, EmittedLayer, KerasBuilder
from .tflite_binary import DOMAIN as BINARY_DOMAIN
from .tflite_binary import Rejected, fuse_binary_layers, layer_name

SHAPE_ARITHMETIC = ("ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Gather", "Squeeze",
                    "Unsqueeze", "Range")
KERAS_TO_TFLITE = {"QuantConv2D": "LceBconv2d", "Conv2D": "CONV_2D", "DepthwiseConv2D": "DEPTHWISE_CONV_2D",
                   "Dense": "FULLY_CONNECTED"}
PROBES_PER_KIND = 8
MATCH_REQUIRED = 0.999  # float layers may round differently in TF and TFLite on a rare probe element
KERNEL_TIMING_BUDGET_S = 0.4


@dataclass
class TfliteArtifact:
    data: bytes
    ops: list[str]
    rows: list[Any] = field(default_factory=list)
    binary_floor_bytes: float = 0.0
    binary_stored_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def convert_for_pipeline(cap: Capture, meta: dict[str, Any], bitpacked: bool):
    """The pipeline's entry point: IR → ``Converted`` (artifact bytes and export summary)."""
    from htaf_export.pipeline import Converted

    art = convert(cap, meta, bitpacked)
    return Converted(art.data, art.rows, art.binary_floor_bytes, art.binary_stored_bytes, art.notes)


def convert(cap: Capture, metadata: dict[str, Any], bitpacked: bool) -> TfliteArtifact:
    """IR → .tflite bytes with ``metadata`` (values JSON-encoded) and the layout/step map in the file."""
    if cap.streaming:
        raise UnsupportedLayer("model", "TFLite targets export unrolled models only (no streaming state)")
    model = ir.from_proto(ir.to_proto(cap.model))  # converters never modify the shared IR
    # Shape arithmetic on constants (TorchScript's computed Pad widths) becomes constants, so that the
    # patterns below see constant pads; the default folding rules leave such ops alone.
    fold_constants(model, should_fold=lambda n: True if n.domain == "" and n.op_type in SHAPE_ARITHMETIC else None)
    _, rejected = fuse_binary_layers(model, bitpacked)
    fold_batchnorm_into_steps(model)
    built = KerasBuilder(bitpacked).build(cap, model.graph)
    data = _to_tflite(built.model, bitpacked)
    flat = rt.read_model(data)
    ops = rt.op_names(flat)
    _check_ops(flat, ops, built.layers, bitpacked)
    io_specs = _io_specs(flat, built)
    observed, unobserved = locate_steps(data, built, cap, lce="LceBconv2d" in ops or bitpacked)
    kernel, timings = choose_kernel(data) if "LceBconv2d" in ops else (None, {})
    ties = sorted({s.tie for s in cap.steps})
    meta = {**{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()},
            "htaf_export.tie": ties[0] if len(ties) == 1 else ("mixed" if ties else "ge"),
            "htaf_export.steps": json.dumps([s.__dict__ for s in cap.steps], sort_keys=True),
            rt.IO_KEY: _json(io_specs),
            rt.OBSERVED_KEY: _json(observed),
            rt.UNOBSERVED_KEY: _json(unobserved),
            rt.STEP_LAYERS_KEY: _json(feeding_layers(model.graph, cap.step_tensors))}
    if kernel:
        meta[rt.KERNEL_KEY] = kernel
        meta[rt.KERNEL_MS_KEY] = _json({k: round(v, 4) for k, v in timings.items()})
    data = rt.with_metadata(data, meta)
    art = TfliteArtifact(data, ops, metadata=meta)
    _summarize(art, flat, built, rejected, observed, unobserved, cap, bitpacked)
    if kernel:
        art.notes.append("LCE kernel timed on this file at batch 1, 1 thread: " +
                         ", ".join(f"{k} {v:.3f} ms" for k, v in timings.items()) +
                         f"; fastest ({kernel}) recorded in the metadata as {rt.KERNEL_KEY}")
    return art


def feeding_layers(graph: ir.Graph, steps: list[str], depth: int = 8) -> dict[str, str]:
    """For each step tensor, the weight layer nearest upstream in the (fused) IR: names failures in reports."""
    producers = {id(o): n for n in graph for o in n.outputs}
    by_name = {o.name: o for n in graph for o in n.outputs}
    found: dict[str, str] = {}
    for step in steps:
        frontier = [by_name[step]] if step in by_name else []
        for _ in range(depth):
            nodes = [producers[id(v)] for v in frontier if v is not None and id(v) in producers]
            hit = next((n for n in nodes if n.domain == BINARY_DOMAIN or
                        (n.domain == "" and n.op_type in ("Conv", "Gemm", "MatMul"))), None)
            if hit is not None:
                found[step] = hit.meta["binary"].name if hit.domain == BINARY_DOMAIN else layer_name(hit)
                break
            frontier = [v for n in nodes for v in n.inputs]
            if not frontier:
                break
    return found


# ---- conversion --------------------------------------------------------------------------------


def _to_tflite(model, bitpacked: bool) -> bytes:
    """Keras model → .tflite, through LCE's converter (bit-packed) or TensorFlow's (float).

    Both convert the traced model function saved with its weights only: the converters' own Keras entry
    points save every layer's Python state too, which takes seconds for a graph of many small layers."""
    tf = rt.tensorflow()
    specs = [tf.TensorSpec(t.shape, tf.float32, name=t.name.split(":")[0]) for t in model.inputs]
    names = list(model.output_names)
    fn = tf.function(lambda *xs: dict(zip(names, _as_list(model(list(xs) if len(xs) > 1 else xs[0])))))
    concrete = fn.get_concrete_function(*specs)
    holder = tf.Module()
    holder.weights = list(model.weights)
    try:
        import larq_compute_engine as lce
    except ImportError:
        if bitpacked:
            raise BadInput("--target tflite needs larq-compute-engine: pip install 'htaf-export[tflite]'") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), rt.quiet_stderr():
            warnings.simplefilter("ignore")
            if not bitpacked:
                return bytes(tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder).convert())
            with tempfile.TemporaryDirectory() as saved:
                tf.saved_model.save(holder, saved, signatures={"serving_default": concrete})
                return bytes(lce.convert_saved_model(saved))
    except Exception as e:  # noqa: BLE001 - the converters raise ConverterError and others, with long texts
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UnsupportedLayer("model", f"the {'LCE' if bitpacked else 'TFLite'} converter failed: {first[:300]}") from None


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_ops(flat, ops: list[str], layers: list[EmittedLayer], bitpacked: bool) -> None:
    """Refuse what the converters do silently: custom ops in a float build, or a binary layer LCE left in
    float (LCE recognises a binary kernel by its values, and falls back without a word)."""
    if not bitpacked:
        custom = rt.schema().BuiltinOperator.CUSTOM
        names = sorted({_text(c.customCode) for c in flat.operatorCodes
                        if max(c.builtinCode, c.deprecatedBuiltinCode) == custom})
        if names:
            raise UnsupportedLayer("model", f"the float build contains custom ops {names}")
        return
    expected = [e.name for e in {e.name: e for e in layers if e.keras == "QuantConv2D"}.values()]
    if ops.count("LceBconv2d") != len([e for e in layers if e.keras == "QuantConv2D"]):
        raise UnsupportedLayer(", ".join(expected) or "model",
                               f"LCE bit-packed {ops.count('LceBconv2d')} of the {len(expected)} binary layers")


def _io_specs(flat, built: Built) -> dict[str, list[dict[str, Any]]]:
    """Input and output tensor indices, matched by the Keras names the signature keeps."""
    graph = flat.subgraphs[0]
    sig_in: dict[str, int] = {}
    sig_out: dict[str, int] = {}
    for sig in flat.signatureDefs or []:
        sig_in.update({_text(t.name): int(t.tensorIndex) for t in sig.inputs})
        sig_out.update({_text(t.name): int(t.tensorIndex) for t in sig.outputs})
    inputs = []
    for k, spec in enumerate(built.inputs):
        index = sig_in.get(built.model.inputs[k].name.split(":")[0], int(graph.inputs[k]))
        inputs.append({**spec, "index": index})
    outputs = []
    for k, spec in enumerate(built.outputs):
        # Without a signature (LCE's graph-def fallback) the subgraph keeps the Keras output order.
        index = sig_out.get(spec["keras"], int(graph.outputs[k]) if not sig_out else None)
        if index is None:
            raise UnsupportedLayer(spec["name"], "the converter did not keep this output in the signature")
        outputs.append({**spec, "index": index, "encoding": "float"})
    return {"inputs": inputs, "outputs": outputs}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- locating step tensors ---------------------------------------------------------------------


def probe_inputs(specs: list[dict[str, Any]]) -> list[np.ndarray]:
    """PyTorch-layout probe inputs whose sums stay exact in float32 (integers, eighths, sixteenths)."""
    rng = np.random.default_rng(0)
    arrays = []
    for spec in specs:
        shape = (PROBES_PER_KIND, *spec["shape"])
        arrays.append(np.concatenate([
            rng.integers(-2, 3, shape).astype(np.float32),
            (np.round(rng.standard_normal(shape) * 8) / 8).astype(np.float32),
            (rng.integers(0, 17, shape) / 16).astype(np.float32),
        ]))
    return arrays


def _interpreter(data: bytes, lce: bool):
    """``run(sample inputs) -> {tensor index: array}`` over the file's outputs, on the interpreter that runs it."""
    outputs = [int(i) for i in rt.read_model(data).subgraphs[0].outputs]
    if lce:
        from larq_compute_engine.tflite.python.interpreter import Interpreter

        lce_it = Interpreter(data, num_threads=1, use_indirect_bgemm=True)
        return lambda xs: dict(zip(outputs, lce_it.interpreter.predict(xs)))
    tf = rt.tensorflow()
    with rt.quiet_stderr():
        it = tf.lite.Interpreter(model_content=data, num_threads=1)
        it.allocate_tensors()
    indices = [d["index"] for d in it.get_input_details()]

    def run(xs):
        for index, x in zip(indices, xs):
            it.set_tensor(index, x)
        it.invoke()
        return {i: it.get_tensor(i) for i in outputs}

    return run


def _encodings(tensor, stored: list[int]) -> list[str]:
    """How a tensor of the file could hold a step stored as ``stored`` (its Keras shape without the batch)."""
    sch = rt.schema()
    shape = [int(d) for d in tensor.shape[1:]] if tensor.shape is not None else []
    if tensor.type == sch.TensorType.FLOAT32 and shape == stored:
        return ["float", "presign"]
    if tensor.type == sch.TensorType.INT32 and stored and shape[:-1] == stored[:-1] and shape[-1] == -(-stored[-1] // 32):
        return ["bitpacked"]
    return []


def locate_steps(data: bytes, built: Built, cap: Capture, lce: bool) -> tuple[list[dict], list[dict]]:
    """Find, for each step, the tensor of the file that holds it: run the file (every tensor of a fitting
    shape exposed) and the Keras model on the same probe inputs and keep the candidate that agrees.
    Returns (observed step specs, unobserved steps with the reason)."""
    unobserved = [{"tensor": s.tensor, "reason": "the converted graph does not compute it"}
                  for s in cap.steps if s.tensor not in built.steps]
    names = [s.tensor for s in cap.steps if s.tensor in built.steps]
    if not names:
        return [], unobserved
    flat = rt.read_model(data)
    graph = flat.subgraphs[0]
    skip = {int(i) for i in graph.inputs}
    pairs = [{"tensor": n, "index": i, "encoding": e, "layout": spec["layout"], "shape": spec["shape"],
              "levels": spec["levels"], "tie": spec["tie"], "channels": spec["stored"][-1]}
             for n in names for spec in [built.steps[n]]
             for i, t in enumerate(graph.tensors) if i not in skip and not rt.is_constant(flat, i)
             for e in _encodings(t, spec["stored"])]
    inputs = [rt.encode_input(x, spec) for x, spec in zip(probe_inputs(built.inputs), built.inputs)]
    with contextlib.redirect_stdout(io.StringIO()):
        expected = built.probe.predict(inputs, verbose=0, batch_size=len(inputs[0]))
    expected = expected if isinstance(expected, list) else [expected]
    wanted = {n: rt.to_torch_layout(e, built.steps[n]["layout"], built.steps[n]["shape"])
              for n, e in zip(built.steps, expected)}
    run = _interpreter(rt.with_outputs(data, sorted({p["index"] for p in pairs})), lce)
    agree = np.zeros(len(pairs))
    for k in range(len(inputs[0])):  # one sample at a time: memory stays one sample of every tensor
        values = run([x[k:k + 1] for x in inputs])
        decoded: dict[tuple, np.ndarray] = {}
        for j, p in enumerate(pairs):
            key = (p["index"], p["encoding"], p["levels"], p["tie"], p["layout"], tuple(p["shape"]), p["channels"])
            if key not in decoded:
                decoded[key] = rt.decode(values[p["index"]], p)
            agree[j] += float(np.mean(decoded[key] == wanted[p["tensor"]][k:k + 1]))
    agree /= len(inputs[0])
    preference = {"float": 2, "bitpacked": 1, "presign": 0}
    used: set[int] = set()
    observed = []
    for name in names:
        keras_name = built.steps[name]["keras"]
        scored = [((agree[j], preference[p["encoding"]], f"/{keras_name}/" in _text(graph.tensors[p["index"]].name),
                    -p["index"]), p) for j, p in enumerate(pairs) if p["tensor"] == name and p["index"] not in used]
        best = max(scored, key=lambda item: item[0], default=None)
        if best is not None and best[0][0] >= MATCH_REQUIRED:
            observed.append(best[1])
            used.add(best[1]["index"])
        else:
            unobserved.append({"tensor": name, "reason": "no tensor of the file holds it (fused into a kernel)"})
    return observed, unobserved


# ---- kernel choice -----------------------------------------------------------------------------


def choose_kernel(data: bytes, threads: int = 1) -> tuple[str, dict[str, float]]:
    """Time LCE's default and indirect-BGEMM kernels on the built file at batch 1; the faster wins."""
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    timings: dict[str, float] = {}
    for kernel, options in rt.LCE_KERNELS.items():
        interpreter = Interpreter(data, num_threads=threads, **options)
        x = [np.zeros(shape, dtype=np.float32) for shape in interpreter.input_shapes]
        interpreter.interpreter.predict(x)  # warm-up: allocation, packing
        runs: list[float] = []
        start = time.perf_counter()
        while len(runs) < 50 and (len(runs) < 3 or time.perf_counter() - start < KERNEL_TIMING_BUDGET_S / 2):
            t = time.perf_counter()
            interpreter.interpreter.predict(x)
            runs.append(time.perf_counter() - t)
        timings[kernel] = 1000 * float(np.median(runs))
    return min(timings, key=timings.__getitem__), timings


# ---- export summary ----------------------------------------------------------------------------


def _producers(flat, ops: list[str]) -> dict[int, str]:
    return {int(t): ops[k] for k, op in enumerate(flat.subgraphs[0].operators) for t in op.outputs}


def _summarize(art: TfliteArtifact, flat, built: Built, rejected: list[Rejected], observed: list[dict],
               unobserved: list[dict], cap: Capture, bitpacked: bool) -> None:
    from htaf_export.pipeline import LayerRow

    why = {r.name: r.reason for r in rejected}
    producer = _producers(flat, art.ops)
    by_step = {spec["tensor"]: spec for spec in observed}
    graph = flat.subgraphs[0]
    filters = {graph.tensors[int(op.inputs[1])].buffer: int(op.inputs[1])  # a shared layer's filter counts once
               for op, name in zip(graph.operators, art.ops) if name == "LceBconv2d"}
    stored_packed = sum(rt.constant_bytes(flat, index) for index in filters.values())
    calls: dict[str, int] = {}
    for layer in built.layers:
        calls[layer.name] = calls.get(layer.name, 0) + 1
    seen: set[str] = set()
    for layer in built.layers:
        if layer.name in seen:
            continue
        seen.add(layer.name)
        op = KERAS_TO_TFLITE.get(layer.keras, layer.keras)
        b = layer.binary
        notes = []
        if b is not None:
            became = "LceBconv2d (bit-packed)" if b.lce else f"{op} (float, ±1 weights)"
            if bitpacked and not b.lce:
                notes.append(f"fell back to float: {b.reason}")
            if b.mode == "threshold" and bitpacked:
                spec = by_step.get(b.step or "")
                packed = spec is not None and spec["encoding"] == "bitpacked" and producer.get(spec["index"]) == op
                notes.append("bit-packed output" if packed else "float output")
            elif b.scale is not None:
                notes.append("exact integer sums, then batch norm as a 1x1 DEPTHWISE_CONV_2D (folded into the "
                             "layer it would lose precision)")
            notes += b.notes + ([b.lce_note] if b.lce and b.lce_note else [])
        else:
            became = f"{op} (float{', ±1 weights as float32' if layer.binary_weights else ''})"
            reason = why.get(layer.name, layer.note)
            if bitpacked and layer.binary_weights and reason:
                notes.append(reason)
        if calls[layer.name] > 1:
            notes.append(f"called {calls[layer.name]} times, weights stored once")
        art.rows.append(LayerRow(layer.name, became, "; ".join(notes)))
    for spec in observed:
        step = next(s for s in cap.steps if s.tensor == spec["tensor"])
        kind = {"float": f"{'±1' if spec['levels'] == 'pm1' else '{0,1}'} float",
                "bitpacked": "bit-packed int32", "presign": "float pre-activation"}[spec["encoding"]]
        art.rows.append(LayerRow(spec["tensor"], f"{producer.get(spec['index'], 'input')} output ({kind})",
                                 f"tie {step.tie}; validated from tensor #{spec['index']}"))
    for spec in unobserved:
        art.rows.append(LayerRow(spec["tensor"], "not observable", spec["reason"]))
    binary = list({e.name: e for e in built.layers if e.binary_weights}.values())
    art.binary_floor_bytes = sum(e.numel for e in binary) / 8
    art.binary_stored_bytes = stored_packed + sum(4 * e.numel for e in binary if e.keras != "QuantConv2D")
    packed_floor = sum(e.numel for e in binary if e.keras == "QuantConv2D") / 8
    if packed_floor:
        art.notes.append(f"bit-packed layers: {stored_packed:,} B of weights vs 1-bit floor {packed_floor:,.0f} B "
                         f"= {stored_packed / packed_floor:.3f}x; whole file vs the floor of all ±1 weights "
                         f"= {len(art.data) / art.binary_floor_bytes:.3f}x")
