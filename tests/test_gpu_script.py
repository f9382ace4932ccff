"""scripts/gpu-parity.sh: runs on a machine without a GPU too, where the GPU backends are listed as skipped
with their reason (never failed), and every CPU row passes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_parity_script_prints_one_row_per_backend(tmp_path):
    table = tmp_path / "gpu.md"
    done = subprocess.run([str(ROOT / "scripts" / "gpu-parity.sh"), "--quick", "--markdown", str(table)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(" | ") for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    by_model = {}
    for r in rows[1:]:
        by_model.setdefault(r[0].strip("| "), {})[r[1]] = r[5]
    assert set(by_model) == {"bnn_mlp", "bnn_cnn", "dhn_mlp", "snn_mlp", "icbm_cnn", "bnn_resnet"}
    for model, backends in by_model.items():
        assert backends["onnxruntime-cpu"] == "pass", model
        if not torch.cuda.is_available():
            assert backends["torch-cuda"].startswith("skip ("), model
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in table.read_text()
