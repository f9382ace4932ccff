"""NIR target against snnTorch's own NIR export of the same network, measured in the same run.

    python benchmarks/bench_nir.py [--quick]

The network: 64 → 128 → 128 → 10, two LIF layers (leak 0.9, threshold 1, zero reset), 8 time steps, direct-coded
digits input; the same weights as an ``snn.Leaky`` network for snnTorch.

- **Export**: `htaf_export.export(..., "nir", validate_artifact=False)` end to end (load, harden, capture, convert,
  write) against snnTorch's `export_to_nir` + `nir.write` of the `snn.Leaky` network (baseline), best of 3.
- **Size**: both files.
- **Spike agreement**: each file loaded by snnTorch's importer (`import_from_nir`) and run for 8 steps on the
  digits; the fraction of hidden spikes (every neuron, every step) and of output values equal to what the file's
  own PyTorch model computes. snnTorch's exporter is measured twice: with a zero reset, and with its default
  subtract reset, which a NIR LIF cannot carry (htaf-export refuses that model; snnTorch writes a file that
  resets to zero).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import nir  # noqa: E402
import snntorch as snn  # noqa: E402
from snntorch.export_nir import export_to_nir  # noqa: E402
from snntorch.import_nir import import_from_nir  # noqa: E402

import htaf_export  # noqa: E402
from htaf_export.data import digits  # noqa: E402
from htaf_export.harden import harden  # noqa: E402
from htaf_export.models.snn import SnnMLP  # noqa: E402
from htaf_export.reference import run_reference  # noqa: E402
from htaf_export.runtimes import read_artifact  # noqa: E402
from htaf_export.runtimes.nir_snntorch import SnnTorchRunner  # noqa: E402

from common import best_of, console, dump, machine, table  # noqa: E402

STEPS, LEAK, THRESHOLD = 8, 0.9, 1.0


def snntorch_twin(model: SnnMLP, reset: str) -> torch.nn.Sequential:
    """The same network as snn.Leaky layers. β and the threshold are given per neuron: with scalars, snnTorch
    1.0.0's exporter writes LIF parameters of shape () that nir 1.0.8's type check rejects."""
    layers: list[torch.nn.Module] = []
    for fc in model.fcs:
        n = fc.out_features
        layers += [fc, snn.Leaky(beta=torch.full((n,), LEAK), threshold=torch.full((n,), THRESHOLD),
                                 reset_mechanism=reset, init_hidden=True)]
    return torch.nn.Sequential(*layers, model.fc_out).eval()


def run_steps(net: torch.nn.Module, x: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray]:
    """(every Leaky's spikes at every step, the output summed over steps) of an snnTorch-style network."""
    leaky = [m for m in net.modules() if isinstance(m, snn.Leaky)]
    seen: list[np.ndarray] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().numpy().copy())) for m in leaky]
    for m in leaky:
        m.reset_mem()
    total = torch.zeros(())
    with torch.no_grad():
        for _ in range(STEPS):
            out = net(x)
            total = total + (out[0] if isinstance(out, tuple) else out)
    for h in hooks:
        h.remove()
    return seen, total.numpy()


def imported(graph) -> torch.nn.Module:
    with contextlib.redirect_stdout(io.StringIO()):
        return import_from_nir(graph)


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    equal = sum(int((x == y).sum()) for x, y in zip(a, b))
    return equal / sum(x.size for x in a)


def htaf_row(model: SnnMLP, path: Path, x: np.ndarray) -> list[object]:
    def export() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            htaf_export.export(path, "nir", path.with_suffix(".nir"), validate_artifact=False)

    seconds = best_of(export)
    artifact = path.with_suffix(".nir")
    hardened = harden(model).model
    ref = run_reference(hardened, (torch.from_numpy(x),), ["logits"])
    got = SnnTorchRunner(read_artifact(artifact)).run({"input": x})
    names = sorted(t for t in got if "@" in t)
    mine = [ref.steps[(n.split("@")[0], int(n.split("@")[1]))] for n in names]
    out_equal = float((got["logits"] == ref.outputs["logits"]).mean())
    return ["htaf-export (zero reset)", seconds, artifact.stat().st_size, agreement(mine, [got[n] for n in names]),
            out_equal]


def snntorch_row(model: SnnMLP, reset: str, x: np.ndarray) -> list[object]:
    net = snntorch_twin(model, reset)
    sample = torch.from_numpy(x[:1])
    buffer = io.BytesIO()

    def export() -> None:
        buffer.seek(0)
        buffer.truncate()
        nir.write(buffer, export_to_nir(net, sample, ignore_dims=[0]))

    seconds = best_of(export)
    own_spikes, own_out = run_steps(net, torch.from_numpy(x))
    graph = nir.read(io.BytesIO(buffer.getvalue()))
    back = imported(graph)
    for m in back.modules():
        if isinstance(m, torch.nn.Flatten):
            m.start_dim += 1
    file_spikes, file_out = run_steps(back, torch.from_numpy(x))
    return [f"snnTorch export_to_nir ({reset} reset)", seconds, len(buffer.getvalue()),
            agreement(own_spikes, file_spikes), float((own_out == file_out).mean())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    console.print(f"[bold]NIR target[/bold] on {machine()}")
    torch.manual_seed(0)
    model = SnnMLP(in_features=64, hidden=(128, 128), classes=10, steps=STEPS, leak=LEAK, threshold=THRESHOLD,
                   reset="zero", tie="gt").eval()
    with torch.no_grad():
        for fc in model.fcs:
            fc.weight.mul_(3.0)  # random weights: scaled so that about a third of the neurons fire
    x = digits("all").x[: 200 if args.quick else 1797]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snn_zero.pt"
        htaf_export.save(model, path)
        rows = [htaf_row(model, path, x)] + [snntorch_row(model, r, x) for r in ("zero", "subtract")]
    base = rows[1][1]
    shown = [[r[0], f"{r[1]:.3f}", f"{r[1] / base:.2f}x", f"{r[2]:,}", f"{100 * r[3]:.4f}%", f"{100 * r[4]:.2f}%"]
             for r in rows]
    table(f"export to NIR, {len(x)} digits × {STEPS} steps (baseline: snnTorch, zero reset)",
          ["exporter", "export s", "vs baseline", "bytes", "spikes equal", "outputs equal"], shown)
    dump("nir", {"rows": [dict(zip(["exporter", "export_s", "bytes", "spike_agreement", "output_agreement"], r))
                          for r in rows], "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
