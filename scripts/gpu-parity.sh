#!/usr/bin/env bash
# GPU parity on the samples and bnn_resnet, one table (see scripts/gpu_parity.py). Runs where the project is
# installed: this checkout's .venv, else the python on PATH (e.g. a CUDA machine, `pip install --no-deps -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_parity.py "$@"
