"""Experiments, not part of run_all.py: what proposed changes to the exporter would save, measured by
monkeypatching copies of its functions in this process (nothing in the package changes).

    python benchmarks/whatif_export.py [--quick]

A. locate_steps drops a candidate tensor as soon as it can no longer reach MATCH_REQUIRED (same result:
   a dropped candidate could never have been chosen), instead of decoding and comparing every candidate
   on every probe input;
B. the Keras probe model is called directly (``probe(inputs, training=False)``) instead of ``predict``,
   which builds a predict function and runs Grappler on it (and prints its "No registered '' OpKernel"
   warnings on stderr);
C. the kernel choice times each LCE kernel on 3 runs after its warm-up (KERNEL_TIMING_BUDGET_S = 0)
   instead of filling a 0.4 s budget;
D. (size) a per-channel constant in NHWC layout (a batch-norm threshold before a step) is stored as
   (C,), which broadcasts along NHWC's last axis, instead of being broadcast to (H, W, C);
E. (capture, both targets) torch.onnx.export rebuilds ONNXRegistry.from_torchlib() on every call; a
   per-process cache of it (torch private API) saves that on every export after the first.

Each variant is checked to give the same observed step tensors / kernel as the current code (D: parity).
Delete this file once the converter has adopted or rejected these changes: it copies converter internals.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import htaf_export  # noqa: E402
from htaf_export.converters import tflite as conv  # noqa: E402
from htaf_export.converters.keras_builder import KerasBuilder  # noqa: E402
from htaf_export.models import build  # noqa: E402
from htaf_export.runtimes import tflite as rt  # noqa: E402

DIRECT_PROBE = {"on": False}


def locate_steps_pruned(data, built, cap, lce):
    """converters.tflite.locate_steps with changes A (prune hopeless candidates) and, when DIRECT_PROBE is on, B."""
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
             for e in conv._encodings(t, spec["stored"])]
    inputs = [rt.encode_input(x, spec) for x, spec in zip(conv.probe_inputs(built.inputs), built.inputs)]
    with contextlib.redirect_stdout(io.StringIO()):
        if DIRECT_PROBE["on"]:  # B
            expected = built.probe(inputs if len(inputs) > 1 else inputs[0], training=False)
            expected = [e.numpy() for e in expected] if isinstance(expected, (list, tuple)) else expected.numpy()
        else:
            expected = built.probe.predict(inputs, verbose=0, batch_size=len(inputs[0]))
    expected = expected if isinstance(expected, list) else [expected]
    wanted = {n: rt.to_torch_layout(e, built.steps[n]["layout"], built.steps[n]["shape"])
              for n, e in zip(built.steps, expected)}
    run = conv._interpreter(rt.with_outputs(data, sorted({p["index"] for p in pairs})), lce)
    n = len(inputs[0])
    agree = np.zeros(len(pairs))
    alive = list(range(len(pairs)))
    for k in range(n):
        values = run([x[k:k + 1] for x in inputs])
        decoded: dict[tuple, np.ndarray] = {}
        for j in alive:
            p = pairs[j]
            key = (p["index"], p["encoding"], p["levels"], p["tie"], p["layout"], tuple(p["shape"]), p["channels"])
            if key not in decoded:
                decoded[key] = rt.decode(values[p["index"]], p)
            agree[j] += float(np.mean(decoded[key] == wanted[p["tensor"]][k:k + 1]))
        # A: a candidate whose best possible final agreement is below MATCH_REQUIRED can never be chosen
        alive = [j for j in alive if (agree[j] + (n - k - 1)) / n >= conv.MATCH_REQUIRED]
    agree /= n
    preference = {"float": 2, "bitpacked": 1, "presign": 0}
    used: set[int] = set()
    observed = []
    for name in names:
        keras_name = built.steps[name]["keras"]
        scored = [((agree[j], preference[p["encoding"]], f"/{keras_name}/" in conv._text(graph.tensors[p["index"]].name),
                    -p["index"]), p) for j, p in enumerate(pairs) if p["tensor"] == name and p["index"] not in used]
        best = max(scored, key=lambda item: item[0], default=None)
        if best is not None and best[0][0] >= conv.MATCH_REQUIRED:
            observed.append(best[1])
            used.add(best[1]["index"])
        else:
            unobserved.append({"tensor": name, "reason": "no tensor of the file holds it (fused into a kernel)"})
    return observed, unobserved


ORIGINAL_CONST_LIKE = KerasBuilder.const_like


def const_like_per_channel(array, like):
    """D: a (C, 1, 1) constant against an NHWC tensor stays (C,); anything else as before."""
    a = np.asarray(array, dtype=np.float32)
    full = (1,) + tuple(like.shape)
    if like.layout == "nhwc" and a.ndim <= len(full) and a.size > 1:
        b = a.reshape((1,) * (len(full) - a.ndim) + a.shape)[0]
        if b.ndim == 3 and b.shape[1:] == (1, 1) and b.shape[0] == like.shape[0]:
            return np.ascontiguousarray(b.reshape(-1))
    return ORIGINAL_CONST_LIKE(array, like)


def export(path: Path, out: Path, validate: bool = False):
    with contextlib.redirect_stdout(io.StringIO()), rt.quiet_stderr():
        return htaf_export.export(path, "tflite", out, validate_artifact=validate)


def best_convert(path: Path, tmp: Path, repeat: int = 3):
    """Best convert-stage seconds over ``repeat`` exports, and the last result."""
    best = float("inf")
    for _ in range(repeat):
        result = export(path, tmp / "w.tflite")
        best = min(best, result.seconds["convert"])
    return best, result


def observed_and_kernel(result):
    meta = rt.read_metadata(rt.read_model(result.converted.data))
    return meta[rt.OBSERVED_KEY], meta.get(rt.KERNEL_KEY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller bnn_resnet (blocks 2,2,2,2)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    resnet = build("bnn_resnet", {"blocks": [2, 2, 2, 2]} if args.quick else {}).eval()
    htaf_export.save(resnet, tmp / "bnn_resnet.pt")
    nets = {"bnn_cnn": Path(__file__).resolve().parents[1] / "sample_models" / "bnn_cnn.pt",
            "bnn_resnet": tmp / "bnn_resnet.pt"}
    for path in nets.values():
        export(path, tmp / "w.tflite")  # warm-up
    budget = conv.KERNEL_TIMING_BUDGET_S
    original = conv.locate_steps
    for name, path in nets.items():
        base, r0 = best_convert(path, tmp)
        print(f"{name}: convert stage, best of 3: now {base:.3f} s")
        conv.locate_steps = locate_steps_pruned
        a, ra = best_convert(path, tmp)
        print(f"  A  pruned candidates:        {a:.3f} s (saves {base - a:.3f} s); same steps found: "
              f"{observed_and_kernel(ra)[0] == observed_and_kernel(r0)[0]}")
        DIRECT_PROBE["on"] = True
        b, rb = best_convert(path, tmp)
        print(f"  A+B and direct probe call:   {b:.3f} s (saves {base - b:.3f} s); same steps found: "
              f"{observed_and_kernel(rb)[0] == observed_and_kernel(r0)[0]}")
        DIRECT_PROBE["on"] = False
        conv.locate_steps = original
        conv.KERNEL_TIMING_BUDGET_S = 0.0
        c, rc = best_convert(path, tmp)
        print(f"  C  3 timed runs per kernel:  {c:.3f} s (saves {base - c:.3f} s); same kernel: "
              f"{observed_and_kernel(rc)[1] == observed_and_kernel(r0)[1]} ({observed_and_kernel(rc)[1]})")
        conv.locate_steps = locate_steps_pruned
        DIRECT_PROBE["on"] = True
        abc, _ = best_convert(path, tmp)
        print(f"  A+B+C:                       {abc:.3f} s (saves {base - abc:.3f} s, "
              f"{100 * (base - abc) / base:.0f}% of convert)")
        conv.locate_steps, DIRECT_PROBE["on"], conv.KERNEL_TIMING_BUDGET_S = original, False, budget
    for name, path in nets.items():
        validate = name == "bnn_cnn"
        r0 = export(path, tmp / "d0.tflite", validate)
        KerasBuilder.const_like = staticmethod(const_like_per_channel)
        try:
            r1 = export(path, tmp / "d1.tflite", validate)
        finally:
            KerasBuilder.const_like = staticmethod(ORIGINAL_CONST_LIKE)
        parity = f"; parity {r0.report.passed} -> {r1.report.passed}" if validate else ""
        print(f"D  per-channel constants, {name}: {len(r0.converted.data):,} B -> {len(r1.converted.data):,} B{parity}")
    registry_cache(nets, tmp)


def registry_cache(nets: dict[str, Path], tmp: Path) -> None:
    """E: whole exports (no validation), best of 3, with and without a cached torchlib registry."""
    from torch.onnx._internal.exporter import _registration

    def best_export(path: Path, target: str) -> tuple[float, bytes]:
        best, data = float("inf"), b""
        for _ in range(3):
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), rt.quiet_stderr():
                result = htaf_export.export(path, target, tmp / ("e.onnx" if target == "onnx" else "e.tflite"),
                                            validate_artifact=False)
            best, data = min(best, time.perf_counter() - start), result.converted.data
        return best, data

    original = _registration.ONNXRegistry.from_torchlib  # a classmethod, bound to the class
    cache: dict[int, object] = {}

    def cached(self, opset_version=18):
        if opset_version not in cache:
            cache[opset_version] = original(opset_version=opset_version)
        return copy.copy(cache[opset_version])

    for name, path in nets.items():
        for target in ("onnx", "tflite"):
            before, data0 = best_export(path, target)
            _registration.ONNXRegistry.from_torchlib = cached
            try:
                best_export(path, target)  # fills the cache
                after, data1 = best_export(path, target)
            finally:
                _registration.ONNXRegistry.from_torchlib = original
            same = "same bytes" if data0 == data1 else "bytes differ (the TFLite file holds timings)"
            print(f"E  cached torchlib registry, {name} → {target}: export {before:.3f} s -> {after:.3f} s "
                  f"(saves {before - after:.3f} s); {same}")


if __name__ == "__main__":
    main()
