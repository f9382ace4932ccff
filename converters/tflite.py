"""TFLite targets: ``tflite`` (binary layers bit-packed by Larq Compute Engine) and ``tflite-float`` (builtin ops).

    IR ─copy─▶ fuse binary layers (tflite_binary) ─▶ fold the other batch norms into step thresholds
       ─▶ Keras model (keras_builder) ─▶ LCE converter | TFLite converter ─▶ metadata ─▶ .tflite bytes

A binary layer is exact by construction (integer thresholds, see tflite_binary); where LCE cannot
express one exactly it runs as a float conv in the same file, and the summary says why. The file
records how each step tensor is laid out (``TFLITE_STEP_SLOTS``); which tensor of the converted file
holds it is found afterwards by running the file, a runtime stage (``runtimes.tflite_locate``).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from typing import Any, Mapping

import onnx_ir as ir

from htaf_export import metadata as md
from htaf_export import tflite_file as tfl
from htaf_export.capture import Capture
from htaf_export.contracts import Conversion, LayerRow
from htaf_export.errors import BadInput, UnsupportedLayer
from htaf_export.targets import ExportOptions

from .keras_activations import fuse_gelu
from .keras_builder import Built, EmittedLayer, KerasBuilder
from .layer_ops import fused_ir
from .keras_ops import EMITTERS
from .tflite_binary import DOMAIN as BINARY_DOMAIN
from .tflite_binary import layer_name

KERAS_TO_TFLITE = {"QuantConv2D": "LceBconv2d", "Conv2D": "CONV_2D", "DepthwiseConv2D": "DEPTHWISE_CONV_2D",
                   "Dense": "FULLY_CONNECTED"}


def convert_bitpacked(capture: Capture, provenance: Mapping[str, str], options: ExportOptions) -> Conversion:
    """The ``tflite`` target's contract: binary layers bit-packed through LCE."""
    return convert(capture, provenance, bitpacked=True)


def convert_float(capture: Capture, provenance: Mapping[str, str], options: ExportOptions) -> Conversion:
    """The ``tflite-float`` target's contract: builtin ops only."""
    return convert(capture, provenance, bitpacked=False)


def convert(cap: Capture, provenance: Mapping[str, str], bitpacked: bool) -> Conversion:
    """IR → .tflite bytes with ``provenance`` and the layout of every tensor in the file's metadata."""
    if cap.streaming:
        raise UnsupportedLayer("model", "TFLite targets export unrolled models only (no streaming state)")
    model, rejected = fused_ir(cap, bitpacked, two_d=True)
    fuse_gelu(model)
    built = KerasBuilder(bitpacked).build(cap, model.graph, EMITTERS)
    data = _to_tflite(built.model, bitpacked)
    flat = tfl.read_model(data)
    ops = tfl.op_names(flat)
    _check_ops(flat, ops, built.layers, bitpacked)
    ties = sorted({s.tie for s in cap.steps})
    meta = {**md.encode(provenance),
            md.TIE: ties[0] if len(ties) == 1 else ("mixed" if ties else "ge"),
            md.STEPS: json.dumps([s.to_dict() for s in cap.steps], sort_keys=True),
            md.TFLITE_IO: md.compact(_io_slots(flat, built)),
            md.TFLITE_STEP_SLOTS: md.compact([f.to_dict() for f in built.steps.values()]),
            md.TFLITE_STEP_LAYERS: md.compact(feeding_layers(model.graph, cap.step_tensors))}
    data = tfl.with_metadata(data, meta)
    return _summarize(data, flat, ops, built, rejected, bitpacked)


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
    tf = tfl.tensorflow()
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
    from tensorflow.lite.python.convert_phase import ConverterError

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), tfl.quiet_stderr():
            warnings.simplefilter("ignore")
            if not bitpacked:
                return bytes(tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder).convert())
            with tempfile.TemporaryDirectory() as saved:
                tf.saved_model.save(holder, saved, signatures={"serving_default": concrete})
                return bytes(lce.convert_saved_model(saved))
    except (ConverterError, RuntimeError, ValueError, TypeError) as e:  # long texts: the user needs one line
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UnsupportedLayer("model", f"the {'LCE' if bitpacked else 'TFLite'} converter failed: {first[:300]}") from None


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_ops(flat, ops: list[str], layers: list[EmittedLayer], bitpacked: bool) -> None:
    """Refuse what the converters do silently: custom ops in a float build, or a binary layer LCE left in
    float (LCE recognises a binary kernel by its values, and falls back without a word)."""
    custom = tfl.schema().BuiltinOperator.CUSTOM
    names = sorted({tfl.text(c.customCode) for c in flat.operatorCodes
                    if max(c.builtinCode, c.deprecatedBuiltinCode) == custom})
    foreign = [n for n in names if not (bitpacked and n.startswith("Lce"))]  # e.g. a TensorFlow op kept as is
    if foreign:
        raise UnsupportedLayer("model", f"the {'bit-packed' if bitpacked else 'float'} build contains custom ops "
                                        f"{foreign} that no TFLite interpreter runs")
    if not bitpacked:
        return
    expected = [e.name for e in {e.name: e for e in layers if e.keras == "QuantConv2D"}.values()]
    if ops.count("LceBconv2d") != len([e for e in layers if e.keras == "QuantConv2D"]):
        raise UnsupportedLayer(", ".join(expected) or "model",
                               f"LCE bit-packed {ops.count('LceBconv2d')} of the {len(expected)} binary layers")


def _io_slots(flat, built: Built) -> dict[str, list[dict[str, Any]]]:
    """Input and output tensor indices, matched by the Keras names the signature keeps."""
    graph = flat.subgraphs[0]
    sig_in: dict[str, int] = {}
    sig_out: dict[str, int] = {}
    for sig in flat.signatureDefs or []:
        sig_in.update({tfl.text(t.name): int(t.tensorIndex) for t in sig.inputs})
        sig_out.update({tfl.text(t.name): int(t.tensorIndex) for t in sig.outputs})
    inputs = []
    for k, slot in enumerate(built.inputs):
        index = sig_in.get(built.model.inputs[k].name.split(":")[0], int(graph.inputs[k]))
        inputs.append(tfl.IoSlot(slot.name, index, slot.layout, slot.shape).to_dict())
    outputs = []
    for k, slot in enumerate(built.outputs):
        # Without a signature (LCE's graph-def fallback) the subgraph keeps the Keras output order.
        index = sig_out.get(slot.keras, int(graph.outputs[k]) if not sig_out else None)
        if index is None:
            raise UnsupportedLayer(slot.name, "the converter did not keep this output in the signature")
        outputs.append(tfl.IoSlot(slot.name, index, slot.layout, slot.shape, keras=slot.keras).to_dict())
    return {"inputs": inputs, "outputs": outputs}


# ---- export summary ----------------------------------------------------------------------------


def _layer_row(layer: EmittedLayer, calls: int, why: dict[str, str], bitpacked: bool) -> LayerRow:
    op = KERAS_TO_TFLITE.get(layer.keras, layer.keras)
    b = layer.binary
    notes = []
    if b is not None:
        became = "LceBconv2d (bit-packed)" if layer.lce.packed else f"{op} (float, ±1 weights)"
        if bitpacked and not layer.lce.packed:
            notes.append(f"fell back to float: {layer.lce.reason}")
        if b.scale is not None and b.mode != "threshold":
            notes.append("exact integer sums, then the per-channel scale and shift as a 1x1 DEPTHWISE_CONV_2D (not "
                         "folded into the layer: that would round the sums)")
        notes += list(b.notes) + ([layer.lce.note] if layer.lce.packed and layer.lce.note else [])
    else:
        became = f"{op} (float{', ±1 weights as float32' if layer.binary_weights else ''})"
        reason = why.get(layer.name, layer.note)
        if bitpacked and layer.binary_weights and reason:
            notes.append(reason)
        elif not layer.binary_weights and layer.note:  # ±1 weights but for a few zeros: say why not binary
            notes.append(layer.note)
    if calls > 1:
        notes.append(f"called {calls} times, weights stored once")
    return LayerRow(layer.name, became, "; ".join(notes))


def _summarize(data: bytes, flat, ops: list[str], built: Built, rejected: tuple[tuple[str, str], ...],
               bitpacked: bool) -> Conversion:
    why = dict(rejected)
    graph = flat.subgraphs[0]
    filters = {graph.tensors[int(op.inputs[1])].buffer: int(op.inputs[1])  # a shared layer's filter counts once
               for op, name in zip(graph.operators, ops) if name == "LceBconv2d"}
    stored_packed = sum(tfl.constant_bytes(flat, index) for index in filters.values())
    calls: dict[str, int] = {}
    for layer in built.layers:
        calls[layer.name] = calls.get(layer.name, 0) + 1
    first = list({layer.name: layer for layer in reversed(built.layers)}.values())[::-1]
    rows = [_layer_row(layer, calls[layer.name], why, bitpacked) for layer in first]
    binary = list({e.name: e for e in built.layers if e.binary_weights}.values())
    floor = sum(e.numel for e in binary) / 8
    stored = stored_packed + sum(4 * e.numel for e in binary if e.keras != "QuantConv2D")
    packed_floor = sum(e.numel for e in binary if e.keras == "QuantConv2D") / 8
    notes = io_notes(built)
    if packed_floor:
        notes.append(f"bit-packed layers: {stored_packed:,} B of weights vs 1-bit floor {packed_floor:,.0f} B "
                     f"= {stored_packed / packed_floor:.3f}x")
    return Conversion(data, tuple(rows), floor, stored, tuple(notes))


def io_notes(built: Built) -> list[str]:
    """What a user feeding the file must know: an image input or output is channels last, as TFLite lays images
    out; several inputs or outputs are found by name (the subgraph's order is the converter's)."""
    names = [_keras_name(t) for t in built.model.inputs]
    notes = [f"input {name!r} is channels last: [1, {h}, {w}, {c}], the model's [{c}, {h}, {w}] transposed "
             f"(feed x.transpose(0, 2, 3, 1))" for name, slot in zip(names, built.inputs) if slot.layout == "nhwc"
             for c, h, w in [slot.shape]]
    notes += [f"output {slot.name!r} is channels last: [N, {', '.join(map(str, (*slot.shape[1:], slot.shape[0])))}], "
              f"the model's [N, {', '.join(map(str, slot.shape))}] transposed (read y.transpose(0, 3, 1, 2))"
              for slot in built.outputs if slot.layout == "nhwc" and len(slot.shape) == 3]
    if len(built.inputs) > 1 or len(built.outputs) > 1:
        notes.append(f"feed and read by name with interpreter.get_signature_runner(): inputs {', '.join(names)}; "
                     f"outputs {', '.join(o.keras for o in built.outputs)}")
    return notes


def _keras_name(tensor) -> str:
    return tensor.name.split(":")[0]
