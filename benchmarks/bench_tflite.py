"""TFLite targets: latency and size of the bit-packed build against the float build of the same BNN.

    python benchmarks/bench_tflite.py [--quick] [--runs N]

The network: sign(input) → six binary 3x3 convs of 256 channels (pad +1) with batch norm and sign between
them, on a 256×28×28 input; the last conv's batch norm is the float output. It is built from htaf-export's
own layers with random ±1 weights and batch-norm statistics, and goes through the toolchain twice:

- ``tflite`` (bit-packed through LCE; the file's metadata recommends an LCE kernel, by a fixed rule under
  ``--lce-kernel auto``, and that kernel is what is timed here);
- ``tflite-float`` (builtin ops, the stock TFLite interpreter with its default XNNPACK delegate) — the
  **baseline** of every ratio. The same file on TFLite's builtin kernels alone (no XNNPACK) is shown too.

Also measured, for reference: the LCE build on the kernel not chosen, and a hand-built Keras + larq model
of the same shape converted with LCE directly (what a user would write by hand). Latency is the median of
``--runs`` invocations at batch 1 after warm-up, at 1 and 2 threads. Sizes are compared with the 1-bit
floor of the binary weights (one bit per ±1 weight). A short parity check (4 random inputs, against the
hardened PyTorch model) guards against timing a wrong artifact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from htaf_export import harden  # noqa: E402
from htaf_export import metadata as md  # noqa: E402
from htaf_export import pipeline  # noqa: E402
from htaf_export import tflite_file as tfl  # noqa: E402
from htaf_export.capture import capture  # noqa: E402
from htaf_export.nn import HTAF, BinaryConv2d  # noqa: E402
from htaf_export.reference import run_reference  # noqa: E402
from htaf_export.runtimes import tflite as rt  # noqa: E402
from htaf_export.targets import TARGETS, ExportOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import console, dump, machine, median_ms, stock_tflite, table  # noqa: E402


class BinaryStack(nn.Module):
    """sign → [binary 3x3 conv (pad +1) → batch norm → sign] × (convs − 1) → binary conv → batch norm."""

    def __init__(self, convs: int = 6, channels: int = 256, size: int = 28) -> None:
        super().__init__()
        self.input_shape = [channels, size, size]
        layers: list[nn.Module] = [HTAF(levels="pm1", mode="surrogate")]
        for i in range(convs):
            layers += [BinaryConv2d(channels, channels, 3, padding=1, pad_value=1.0), nn.BatchNorm2d(channels)]
            if i < convs - 1:
                layers.append(HTAF(levels="pm1", mode="surrogate"))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def build_network(convs: int, channels: int, size: int) -> nn.Module:
    torch.manual_seed(0)
    model = BinaryStack(convs, channels, size)
    fan_in = 9 * channels
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics of ±1 sums over fan_in terms, as training gives
                m.running_mean.normal_(0, fan_in ** 0.5 / 4)
                m.running_var.uniform_(0.5, 1.5).mul_(fan_in)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.1)
    return model.eval()


def export_both(model: nn.Module) -> dict[str, tuple[bytes, float, tuple[str, ...]]]:
    """Each target's converter and its runtime stage (which locates the step tensors and, bit-packed, times
    both LCE kernels for the summary): (file bytes, seconds, summary notes)."""
    hardened = harden(model).model
    cap = capture(hardened, model.input_shape, ["output"])
    builds = {}
    for target in ("tflite", "tflite-float"):
        start = time.perf_counter()
        conversion = pipeline.convert(cap, TARGETS[target], {md.TARGET: target}, ExportOptions(), hardened)
        builds[target] = (conversion.data, time.perf_counter() - start, conversion.notes)
    return builds


def check_parity(model: nn.Module, data: bytes) -> str:
    """Outputs within 1e-5 (+1e-5 relative) and every step bit-exact on 4 random inputs, on the fastest runner."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.tflite"
        path.write_bytes(data)
        info = rt.read_tflite_artifact(path)
        runner = rt.tflite_runners(info, "cpu")[-1]
        x = np.random.default_rng(1).standard_normal((4, *model.input_shape)).astype(np.float32)
        got = runner.run({info.input_names[0]: x})
    ref = run_reference(harden(model).model, (torch.from_numpy(x),), ["output"])
    err = np.abs(got["output"] - ref.outputs["output"])
    ok = bool(np.all(err <= 1e-5 + 1e-5 * np.abs(ref.outputs["output"])))
    flips = sum(int((got[s.tensor] != ref.steps[(s.site, s.call)]).sum()) for s in info.steps)
    return f"{runner.name}: max output error {err.max():.1e}, {flips} step flips in {len(info.steps)} steps " \
           f"({'ok' if ok and not flips else 'MISMATCH'})"


def time_lce(data: bytes, kernel: str, threads: int, runs: int) -> float:
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    it = Interpreter(data, num_threads=threads, **rt.LCE_KERNELS[kernel])
    x = [np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in it.input_shapes]
    return median_ms(lambda: it.interpreter.predict(x), runs)


def time_stock(data: bytes, threads: int, runs: int, xnnpack: bool = True) -> float:
    """The stock interpreter as users run it (XNNPACK delegate on), or on TFLite's builtin kernels only."""
    return median_ms(stock_tflite(data, threads, xnnpack=xnnpack).invoke, runs)


def hand_built(convs: int, channels: int, size: int) -> bytes:
    """The same shape written directly in Keras + larq, converted by LCE (no htaf-export involved)."""
    tf = tfl.tensorflow()
    import larq
    import larq_compute_engine as lce

    keras = tf.keras
    x = inp = keras.Input((size, size, channels))
    for _ in range(convs):
        x = larq.layers.QuantConv2D(channels, 3, padding="same", pad_values=1.0, input_quantizer="ste_sign",
                                    kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
    model = keras.Model(inp, x)
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(-1, 1, w.shape).astype(np.float32) if w.ndim == 4 else
                       np.abs(rng.normal(1, 0.2, w.shape)).astype(np.float32) for w in model.get_weights()])
    with tfl.quiet_stderr():
        return bytes(lce.convert_keras_model(model))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing runs (a smoke test, not a measurement)")
    parser.add_argument("--runs", type=int, default=None, help="timed invocations per configuration")
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 30)
    convs, channels, size = 6, 256, 28
    console.print(f"[bold]TFLite targets[/bold] on {machine()}: {convs} binary 3x3 convs, {channels} channels, "
                  f"{size}x{size}, batch 1, median of {runs} runs")

    model = build_network(convs, channels, size)
    builds = export_both(model)
    bitpacked, t_bp, notes = builds["tflite"]
    floatbuild, t_fl, _ = builds["tflite-float"]
    meta = tfl.read_metadata(tfl.read_model(bitpacked))
    chosen = meta[md.TFLITE_LCE_KERNEL]
    other = next(k for k in rt.LCE_KERNELS if k != chosen)
    timed = next((n for n in notes if n.startswith("LCE kernel timed")), "no LCE kernel timing in the summary")
    console.print(f"export (capture excluded, locating steps included): tflite {t_bp:.1f} s, tflite-float {t_fl:.1f} s; "
                  f"LCE kernel recommended in the file: {chosen} (metadata {md.TFLITE_LCE_KERNEL})")
    console.print(f"export summary: {timed}")
    console.print("ops (tflite): " + ", ".join(tfl.op_names(tfl.read_model(bitpacked))))
    console.print("parity, tflite: " + check_parity(model, bitpacked))
    console.print("parity, tflite-float: " + check_parity(model, floatbuild))

    floor = convs * channels * channels * 9 / 8
    handmade = hand_built(convs, channels, size)
    measured = {
        f"tflite, LCE {chosen} (chosen)": (bitpacked, lambda th: time_lce(bitpacked, chosen, th, runs)),
        f"tflite, LCE {other}": (bitpacked, lambda th: time_lce(bitpacked, other, th, max(3, runs // 3))),
        "tflite-float, stock TFLite (baseline)": (floatbuild, lambda th: time_stock(floatbuild, th, runs)),
        "tflite-float, stock TFLite without XNNPACK": (floatbuild, lambda th: time_stock(floatbuild, th, runs, False)),
        f"hand-built Keras+LCE, {chosen}": (handmade, lambda th: time_lce(handmade, chosen, th, runs)),
    }
    results = {name: ({th: fn(th) for th in (1, 2)}, len(data)) for name, (data, fn) in measured.items()}
    base = results["tflite-float, stock TFLite (baseline)"][0]
    rows = []
    for name, (ms, size_b) in results.items():
        rows.append([name, f"{ms[1]:.1f}", f"{ms[2]:.1f}", f"{base[1] / ms[1]:.2f}x", f"{base[2] / ms[2]:.2f}x",
                     f"{size_b / 1024:,.1f}", f"{size_b / floor:.3f}x"])
    table("batch-1 latency (ms) and size; speed-up = float TFLite time / this time",
          ["build", "1 thread", "2 threads", "speed-up 1t", "speed-up 2t", "file KiB", "vs 1-bit floor"], rows)
    console.print(f"1-bit floor of the binary weights: {floor / 1024:,.1f} KiB ({convs}x{channels}x{channels}x9 bits)")
    ours, _ = results[f"tflite, LCE {chosen} (chosen)"]
    plain = results["tflite-float, stock TFLite without XNNPACK"][0]
    hand_ms, hand_size = results[f"hand-built Keras+LCE, {chosen}"]
    console.print(f"bit-packed ({chosen}) vs float TFLite: {base[1] / ours[1]:.2f}x at 1 thread, {base[2] / ours[2]:.2f}x "
                  f"at 2 threads (XNNPACK); {plain[1] / ours[1]:.2f}x and {plain[2] / ours[2]:.2f}x against TFLite's "
                  f"builtin float kernels")
    console.print(f"toolchain vs hand-built Keras+LCE: time {ours[1] / hand_ms[1]:.2f}x (1 thread), "
                  f"{ours[2] / hand_ms[2]:.2f}x (2 threads); size {len(bitpacked) / hand_size:.3f}x")
    dump("tflite", {"runs": runs, "floor_bytes": floor, "chosen_kernel": chosen,
                    "results": {n: {"ms": ms, "bytes": b} for n, (ms, b) in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
