#!/usr/bin/env bash
# The benchmark suite in one command: tracing (batched vs naive) and editing, JSON + Markdown
# reports under benchmarks/results/. On a CUDA machine the GPT-J-6B shape runs too.
#   bash benchmarks/run.sh              # full run on the bundled model (tens of minutes on a CPU)
#   bash benchmarks/run.sh --smoke      # seconds, tiny random models (what CI runs, through pytest)
#   bash benchmarks/run.sh --gpu-quick  # a CUDA machine: GPT-J-6B shape in bfloat16, tracing + editing +
#                                       # a small sweep, at most 8 minutes (GPU_QUICK_LIMIT seconds),
#                                       # one folder benchmarks/results/gpu-quick-<device>-<time>/;
#                                       # extra arguments go to benchmarks/gpu_quick.py (--help: what it
#                                       # measures, and how to carry wheels a machine without internet lacks)
#   bash benchmarks/run.sh --gpu-quick --smoke   # the same on a CPU with a tiny model
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # tracekit from this tree, installed or not
if [ "${1:-}" = "--gpu-quick" ]; then
    shift
    limit=${GPU_QUICK_LIMIT:-480}
    # the script stops its stages in time; timeout is the backstop (its report is saved stage by stage)
    exec timeout -k 10 "$limit" "$PY" benchmarks/gpu_quick.py --time-limit $((limit - 25)) "$@"
fi
device=$($PY -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
suffix=$device; [ "${1:-}" = "--smoke" ] && suffix="$device-smoke"
mkdir -p benchmarks/results
$PY benchmarks/bench_tracing.py "$@" --out "benchmarks/results/tracing-$suffix.json"
$PY benchmarks/bench_editing.py "$@" --out-dir benchmarks/results
