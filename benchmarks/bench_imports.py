"""Import cost and cold start: what `import htaf_export` and one command cost in a fresh process.

    python benchmarks/bench_imports.py [--quick]

1. Which heavy packages each entry point loads (TensorFlow must load only for TFLite targets), checked
   in a fresh interpreter through ``sys.modules``: `import htaf_export`, the CLI module, an ONNX export with
   validation, and a TFLite export (the positive control: there TensorFlow must be present).
2. Import time (best wall time of fresh interpreters) of `import htaf_export` against `import torch`,
   which it cannot avoid, and the ``-X importtime`` split of htaf_export's own modules.
3. Cold start: the `htaf-export ... --no-validate` command in a fresh process against a fresh-process
   script that calls the bare converter, on the sample bnn_cnn: for ONNX, load + harden with htaf_export
   (the model's classes live there) and torch.onnx.export; for TFLite, TensorFlow + larq only: build the
   hand-built Keras model and call LCE's convert_keras_model. This is what a user waits for; the warm
   timings of the other scripts leave out the imports and first-call set-up that both sides pay here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, console, dump, machine, table  # noqa: E402

PY = sys.executable
CLI = str(Path(PY).with_name("htaf-export"))
HEAVY = ("tensorflow", "tf_keras", "larq", "larq_compute_engine", "onnxruntime", "onnxscript", "matplotlib", "torch")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1", "PYTHONWARNINGS": "ignore"}
SAMPLE = ROOT / "sample_models" / "bnn_cnn.pt"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=ENV)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        raise RuntimeError(f"{' '.join(args[:4])}: {tail}")
    return out


def loaded_modules(code: str) -> dict[str, bool]:
    out = _run([PY, "-c", code + f"\nimport sys, json\nprint('MODULES', json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"])
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("MODULES")][-1]
    return json.loads(line.split(" ", 1)[1])


def import_checks(tmp: Path) -> list[dict]:
    cases = [
        ("import htaf_export", "import htaf_export", False),
        ("import htaf_export.cli (the command's entry point)", "import htaf_export.cli", False),
        ("htaf-export inspect bnn_cnn", f"from htaf_export.cli import main\nimport contextlib, io\n"
                                        f"with contextlib.redirect_stdout(io.StringIO()): main(['inspect', '{SAMPLE}'])",
         False),
        ("ONNX export of bnn_cnn, with validation",
         f"import htaf_export\nr = htaf_export.export('{SAMPLE}', 'onnx', '{tmp}/a.onnx')\nassert r.report.passed", False),
        ("TFLite export of bnn_cnn (control: TensorFlow expected)",
         f"import htaf_export\nhtaf_export.export('{SAMPLE}', 'tflite', '{tmp}/a.tflite', validate_artifact=False)",
         True),
    ]
    rows = []
    for label, code, expect_tf in cases:
        mods = loaded_modules(code)
        rows.append({"case": label, "modules": mods, "ok": mods["tensorflow"] == expect_tf})
    table("Which heavy packages each entry point imports (fresh interpreter, sys.modules)",
          ["entry point", *HEAVY, "as designed"],
          [[r["case"], *["yes" if r["modules"][m] else "-" for m in HEAVY], "ok" if r["ok"] else "NO"]
           for r in rows])
    return rows


def wall(args: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        _run(args)
        best = min(best, time.perf_counter() - start)
    return best


def import_times(repeat: int) -> dict:
    rows = {
        "python -c pass": wall([PY, "-c", "pass"], repeat),
        "import torch": wall([PY, "-c", "import torch"], repeat),
        "import htaf_export": wall([PY, "-c", "import htaf_export"], repeat),
        "import htaf_export.cli": wall([PY, "-c", "import htaf_export.cli"], repeat),
        "import tensorflow (Keras 2), for TFLite targets only": wall(
            [PY, "-c", "from htaf_export.tflite_file import tensorflow; tensorflow()"], repeat),
    }
    # -X importtime: cumulative microseconds per module; htaf_export's own share is its total minus its imports
    # of third-party packages.
    out = subprocess.run([PY, "-X", "importtime", "-c", "import htaf_export"], capture_output=True, text=True,
                         cwd=ROOT, env=ENV)
    cumulative: dict[str, int] = {}
    own = 0
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [p.strip() for p in line[len("import time:"):].split("|")]
        if not parts[0].isdigit():
            continue
        name = parts[2].strip()
        cumulative[name] = int(parts[1])
        if name.startswith("htaf_export"):
            own += int(parts[0])
    base = rows["python -c pass"]
    table(f"Import time, fresh interpreter (best of {repeat} wall times)", ["import", "wall", "above bare python"],
          [[k, f"{v:.2f} s", f"{v - base:+.2f} s"] for k, v in rows.items()])
    split = {"htaf_export (cumulative)": cumulative.get("htaf_export", 0) / 1e6,
             "torch (cumulative)": cumulative.get("torch", 0) / 1e6,
             "onnx_ir (cumulative)": cumulative.get("onnx_ir", 0) / 1e6,
             "numpy (cumulative)": cumulative.get("numpy", 0) / 1e6,
             "htaf_export's own modules (self time)": own / 1e6}
    table("python -X importtime -c 'import htaf_export' (one run)", ["module", "seconds"],
          [[k, f"{v:.3f}"] for k, v in split.items()])
    return {"wall": rows, "importtime": split}


BARE_ONNX = f"""
import io, contextlib, logging, warnings, torch, htaf_export
warnings.filterwarnings('ignore'); logging.disable(logging.WARNING)
loaded = htaf_export.load('{SAMPLE}')
model = htaf_export.harden(loaded.module).model
with contextlib.redirect_stdout(io.StringIO()):
    program = torch.onnx.export(model, (torch.zeros(2, *loaded.input_shape),), dynamo=True, report=False,
                                dynamic_shapes=({{0: torch.export.Dim('batch', min=1)}},))
program.save('OUT_PATH')
"""

BARE_LCE = """
import sys; sys.path.insert(0, 'benchmarks')
import keras_models as K  # TensorFlow, larq and LCE only: no torch, no htaf_export
open('OUT_PATH', 'wb').write(K.bare_lce(K.keras_bnn_cnn()))
"""


def cold_start(tmp: Path, repeat: int) -> list[dict]:
    rows = []
    for target, bare_code, bare_label in (("onnx", BARE_ONNX, "torch.onnx.export script"),
                                          ("tflite", BARE_LCE, "Keras+larq build + convert_keras_model script")):
        suffix = ".onnx" if target == "onnx" else ".tflite"
        ours = wall([CLI, str(SAMPLE), "--target", target, "--no-validate", "-o", str(tmp / f"cli{suffix}")], repeat)
        full = wall([CLI, str(SAMPLE), "--target", target, "-o", str(tmp / f"cli_full{suffix}")], 1)
        bare = wall([PY, "-c", bare_code.replace("OUT_PATH", str(tmp / f"bare{suffix}"))], repeat)
        rows.append({"target": target, "bare_label": bare_label, "bare_s": bare, "ours_s": ours, "full_s": full})
    table(f"Cold start on bnn_cnn: one fresh process each (best of {repeat}), imports and first-call set-up included",
          ["target", "bare converter script", "", "htaf-export --no-validate", "ratio", "htaf-export (validating)",
           "ratio"],
          [[r["target"], r["bare_label"], f"{r['bare_s']:.2f} s", f"{r['ours_s']:.2f} s",
            f"{r['ours_s'] / r['bare_s']:.2f}x", f"{r['full_s']:.2f} s", f"{r['full_s'] / r['bare_s']:.2f}x"]
           for r in rows])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run each instead of best of 2")
    args = parser.parse_args()
    console.print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        checks = import_checks(tmp)
        times = import_times(1 if args.quick else 2)
        cold = cold_start(tmp, 1 if args.quick else 2)
    dump("imports", {"checks": checks, "times": times, "cold_start": cold})
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
