#!/usr/bin/env bash
# The benchmark suite in one command: tracing (batched vs naive) and editing, JSON + Markdown
# reports under benchmarks/results/. On a CUDA machine the GPT-J-6B shape runs too.
#   bash benchmarks/run.sh            # full run on the bundled model (tens of minutes on a CPU)
#   bash benchmarks/run.sh --smoke    # seconds, tiny random models (what CI runs, through pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
device=$($PY -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
suffix=$device; [ "${1:-}" = "--smoke" ] && suffix="$device-smoke"
mkdir -p benchmarks/results
$PY benchmarks/bench_tracing.py "$@" --out "benchmarks/results/tracing-$suffix.json"
$PY benchmarks/bench_editing.py "$@" --out-dir benchmarks/results
