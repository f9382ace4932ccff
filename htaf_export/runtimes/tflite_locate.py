"""Runtime stage of the TFLite targets: find which tensor of a converted file holds each step, and time LCE.

Converters lay out a step (layout, shape, levels) but cannot know which tensor of the converted file
holds it: TFLite's and LCE's converters fuse, rename and bit-pack. So the file is run on probe inputs,
every tensor of a fitting shape exposed, and compared with an oracle independent of the converter; the
candidate that agrees is recorded in the file's metadata, so validation can read the step back. A step
no tensor holds is reported as not observable, not guessed.

The oracle (given by the pipeline) is the hardened PyTorch model (the integer thresholds of binary layers are derived from its very
float32 operations, so the two agree even on exact ties); steps it cannot record (a TorchScript source) come
from the IR run in ONNX Runtime.

For bit-packed files the LCE kernel to recommend is chosen by a fixed rule (``--lce-kernel auto``:
indirect BGEMM, the faster of the two on every x86 file measured, see benchmarks/README.md), so the
same model gives the same bytes; both kernels are timed for the summary, never for the file.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Callable

import numpy as np
import onnx_ir as ir

from .. import metadata as md
from .. import tflite_file as tfl
from ..capture import Capture
from ..contracts import ORACLE_TIES, Conversion, LayerRow
from ..targets import ExportOptions
from .tflite import lce_interpreter, stock_interpreter, time_kernels

PROBES_PER_KIND = 8
MATCH_REQUIRED = 0.999  # float layers may round differently in the oracle and TFLite on a rare probe element
PREFERENCE = {"float": 2, "bitpacked": 1, "presign": 0}
AUTO_KERNEL = "indirect_bgemm"
# {input name: PyTorch-layout array} → {step tensor: its values}
Oracle = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def finish_bitpacked(conversion: Conversion, capture: Capture, options: ExportOptions, oracle: Oracle) -> Conversion:
    """Locate the steps, record the recommended LCE kernel, time both kernels for the summary."""
    located = _locate(conversion, capture, oracle, lce=True)
    if "LceBconv2d" not in tfl.op_names(tfl.read_model(located.data)):
        return located  # no binary conv: the kernel does not matter
    kernel = AUTO_KERNEL if options.lce_kernel == "auto" else options.lce_kernel.replace("-", "_")
    meta = tfl.read_metadata(tfl.read_model(located.data))
    data = tfl.with_metadata(located.data, {**meta, md.TFLITE_LCE_KERNEL: kernel})
    timings = time_kernels(data)
    note = ("LCE kernel timed on this file at batch 1, 1 thread: " +
            ", ".join(f"{k} {v:.3f} ms" for k, v in timings.items()) +
            f"; recommended in the metadata ({md.TFLITE_LCE_KERNEL}): {kernel}"
            f" ({'--lce-kernel auto' if options.lce_kernel == 'auto' else 'as asked'})")
    return replace(located, data=data, notes=(*located.notes, note))


def finish_float(conversion: Conversion, capture: Capture, options: ExportOptions, oracle: Oracle) -> Conversion:
    return _locate(conversion, capture, oracle, lce=False)


def probe_inputs(slots: tuple[tfl.IoSlot, ...]) -> list[np.ndarray]:
    """PyTorch-layout probe inputs whose sums stay exact in float32 (integers, eighths, sixteenths)."""
    rng = np.random.default_rng(0)
    arrays = []
    for slot in slots:
        shape = (PROBES_PER_KIND, *slot.shape)
        arrays.append(np.concatenate([
            rng.integers(-2, 3, shape).astype(np.float32),
            (np.round(rng.standard_normal(shape) * 8) / 8).astype(np.float32),
            (rng.integers(0, 17, shape) / 16).astype(np.float32),
        ]))
    return arrays


def _encodings(tensor, stored: tuple[int, ...]) -> list[str]:
    """How a tensor of the file could hold a step stored as ``stored`` (its Keras shape without the batch)."""
    sch = tfl.schema()
    shape = [int(d) for d in tensor.shape[1:]] if tensor.shape is not None else []
    if tensor.type == sch.TensorType.FLOAT32 and tuple(shape) == stored:
        return ["float", "presign"]
    if tensor.type == sch.TensorType.INT32 and stored and tuple(shape[:-1]) == stored[:-1] \
            and shape[-1] == -(-stored[-1] // 32):
        return ["bitpacked"]
    return []


def _runner(data: bytes, lce: bool):
    """``run({input tensor index: sample}) -> {tensor index: array}`` over the file's outputs, on the
    interpreter that runs it."""
    graph = tfl.read_model(data).subgraphs[0]
    outputs, order = [int(i) for i in graph.outputs], [int(i) for i in graph.inputs]
    if lce:
        interpreter = lce_interpreter(data, "indirect_bgemm")
        return lambda xs: dict(zip(outputs, interpreter.interpreter.predict([xs[i] for i in order])))
    it = stock_interpreter(data)

    def run(xs):
        for index, x in xs.items():
            it.set_tensor(index, x)
        it.invoke()
        return {i: it.get_tensor(i) for i in outputs}

    return run


def _candidates(flat, forms: list[tfl.StepForm]) -> list[tfl.StepSlot]:
    graph = flat.subgraphs[0]
    produced = {int(o) for op in graph.operators for o in op.outputs}  # a step is computed by an op
    return [tfl.StepSlot(f.tensor, i, e, f.layout, f.shape, f.levels, f.tie, f.stored[-1])
            for f in forms for i, t in enumerate(graph.tensors) if i in produced and not tfl.is_constant(flat, i)
            for e in _encodings(t, f.stored)]


def _agreement(data: bytes, slots: list[tfl.StepSlot], inputs: dict[int, np.ndarray],
               wanted: dict[str, np.ndarray], lce: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean agreement of each candidate with the oracle over the probes, and on the exact ties alone, where a
    step and a sign of the same input part); hopeless candidates stop early."""
    run = _runner(tfl.with_outputs(data, sorted({s.index for s in slots})), lce)
    n = len(next(iter(inputs.values())))
    agree, on_ties = np.zeros(len(slots)), np.zeros(len(slots))
    alive = list(range(len(slots)))
    for k in range(n):  # one sample at a time: memory stays one sample of every tensor
        values = run({index: x[k:k + 1] for index, x in inputs.items()})
        decoded: dict[tfl.StepSlot, np.ndarray] = {}
        for j in alive:
            key = replace(slots[j], tensor="")
            if key not in decoded:
                decoded[key] = tfl.decode(values[slots[j].index], slots[j])
            want = wanted[slots[j].tensor][k:k + 1]
            known = ~np.isnan(want)  # near ties (NaN) count as agreeing either way
            agree[j] += float(np.mean(decoded[key][known] == want[known])) if known.any() else 1.0
            ties = wanted.get(ORACLE_TIES + slots[j].tensor)  # none for steps read from the IR run
            if ties is not None:
                tie = ties[k:k + 1]
                on_ties[j] += float(np.sum(decoded[key][~np.isnan(tie)] == tie[~np.isnan(tie)]))
        # a candidate whose best possible final agreement is below MATCH_REQUIRED can never be chosen
        alive = [j for j in alive if (agree[j] + (n - k - 1)) / n >= MATCH_REQUIRED]
    return agree / n, on_ties


def locate_steps(data: bytes, capture: Capture, oracle: Oracle, lce: bool
                 ) -> tuple[list[tfl.StepSlot], list[dict[str, str]]]:
    """(observed step slots, unobserved steps with the reason) of a converted file."""
    flat = tfl.read_model(data)
    meta = tfl.read_metadata(flat)
    forms = [tfl.StepForm.from_dict(d) for d in json.loads(meta.get(md.TFLITE_STEP_SLOTS, "[]"))]
    laid_out = {f.tensor for f in forms}
    unobserved = [{"tensor": s.tensor, "reason": "the converted graph does not compute it"}
                  for s in capture.steps if s.tensor not in laid_out]
    if not forms:
        return [], unobserved
    layout = tfl.TfliteLayout.of(meta)
    probes = probe_inputs(layout.inputs)
    wanted = oracle({slot.name: x for slot, x in zip(layout.inputs, probes)})
    slots = _candidates(flat, forms)
    agree, on_ties = _agreement(data, slots, {s.index: tfl.encode_input(x, s.layout)
                                              for x, s in zip(probes, layout.inputs)}, wanted, lce)
    graph = flat.subgraphs[0]
    used: set[int] = set()
    observed = []
    twin_of = merged_steps(capture)
    for form in forms:
        twin = next((o for o in observed if o.tensor == twin_of.get(form.tensor)), None)
        if twin is not None:  # the same computation as a step located already: the same tensor holds it
            observed.append(replace(twin, tensor=form.tensor))
            continue
        scored = [((agree[j], on_ties[j], PREFERENCE[s.encoding], f"/{form.keras}/" in tfl.text(graph.tensors[s.index].name),
                    -s.index), s) for j, s in enumerate(slots) if s.tensor == form.tensor and s.index not in used]
        best = max(scored, key=lambda item: item[0], default=None)
        if best is not None and best[0][0] >= MATCH_REQUIRED:
            observed.append(best[1])
            used.add(best[1].index)
        else:
            unobserved.append({"tensor": form.tensor, "reason": "no tensor of the file holds it (fused into a kernel)"})
    return observed, unobserved


def merged_steps(capture: Capture) -> dict[str, str]:
    """{step tensor: the first step tensor computed the same way}, for steps that compute the same thing from the
    same inputs (snnTorch's reset, H(v − θ) of the previous membrane, is the previous spike again): a converter
    keeps one tensor for both, and sparse spikes would let the probes match the twin with another step's tensor."""
    ids: dict[tuple, int] = {}  # each distinct computation gets one number: keys stay flat, however deep the graph
    keys: dict[int, int] = {}

    def key(value: ir.Value | None) -> int:
        if value is None:
            return -1
        if id(value) not in keys:  # a graph input or a constant (node outputs are keyed in graph order below)
            array = value.const_value.numpy() if value.const_value is not None else None
            found = ("const", array.dtype.str, array.shape, array.tobytes()) if array is not None \
                else ("input", str(value.name))
            keys[id(value)] = ids.setdefault(found, len(ids))
        return keys[id(value)]

    values = {}
    for node in capture.model.graph:  # in order, so that every input is keyed before its readers
        attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
        inputs = tuple(key(v) for v in node.inputs)
        for i, out in enumerate(node.outputs):
            if out.const_value is None:
                keys[id(out)] = ids.setdefault((node.domain, node.op_type, attrs, i, inputs), len(ids))
            values[str(out.name)] = out
    first: dict[int, str] = {}
    twins = {}
    for spec in capture.steps:
        if spec.tensor in values:
            twins[spec.tensor] = first.setdefault(key(values[spec.tensor]), spec.tensor)
    return {t: f for t, f in twins.items() if t != f}


def _step_rows(flat, observed: list[tfl.StepSlot], unobserved: list[dict[str, str]],
               capture: Capture) -> list[LayerRow]:
    ops = tfl.op_names(flat)
    producer = {int(t): ops[k] for k, op in enumerate(flat.subgraphs[0].operators) for t in op.outputs}
    tie = {s.tensor: s.tie for s in capture.steps}
    rows = []
    for slot in observed:
        kind = {"float": f"{'±1' if slot.levels == 'pm1' else '{0,1}'} float",
                "bitpacked": "bit-packed int32", "presign": "float pre-activation"}[slot.encoding]
        rows.append(LayerRow(slot.tensor, f"{producer.get(slot.index, 'input')} output ({kind})",
                             f"tie {tie.get(slot.tensor, slot.tie)}; validated from tensor #{slot.index}"))
    rows += [LayerRow(u["tensor"], "not observable", u["reason"]) for u in unobserved]
    return rows


def _locate(conversion: Conversion, capture: Capture, oracle: Oracle, lce: bool) -> Conversion:
    observed, unobserved = locate_steps(conversion.data, capture, oracle, lce)
    flat = tfl.read_model(conversion.data)
    meta = {k: v for k, v in tfl.read_metadata(flat).items() if k != md.TFLITE_STEP_SLOTS}
    meta[md.TFLITE_OBSERVED] = md.compact([s.to_dict() for s in observed])
    meta[md.TFLITE_UNOBSERVED] = md.compact(unobserved)
    data = tfl.with_metadata(conversion.data, meta)
    rows = (*conversion.rows, *_step_rows(flat, observed, unobserved, capture))
    return replace(conversion, data=data, rows=rows)
