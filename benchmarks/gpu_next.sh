#!/usr/bin/env bash
# The next GPU session's checks in one call: at most 570 s of a 15-minute lease (the machine's
# start and the transfers take ~40 s more). What the 2026-11-26 H200 run left open
# (benchmarks/results/gpu-h200-20261126.md):
#   1. the batched tracer against the loop on the 29-token prompt, packed and alone, in bfloat16
#      and float32: is the bfloat16 run's 3.5e-4 rounding, packing or a fault?
#   2. MEMIT, FT-1 and FT-5 over a sweep as a study runs it, 8 points edited together (MEMIT ran
#      out of memory before the factor memo was bounded; FT's shared passes are new since);
#   3. a profile of one warm trace of 8 prompts: where the engine's missing two-thirds of peak go.
# Seven files under OUT (default benchmarks/results/gpu-next-<time>), within the device tool's eight:
#   on the device:  OUT=$OUT bash benchmarks/gpu_next.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-next-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 PYTHON=$PY HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
avail=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)  # key statistics on a RAM disk if it has room
[ "${avail:-0}" -gt 40000000 ] && export TRACEKIT_CACHE=/dev/shm/tracekit
# each part bounded, worst case 570 s in all: the device tool's one call is 600 s
timeout 120 "$PY" benchmarks/trace_agreement.py --dtype bfloat16 --packed --out "$OUT/agreement-bfloat16.json"
timeout 100 "$PY" benchmarks/trace_agreement.py --dtype float32 --out "$OUT/agreement-float32.json"
GPU_QUICK_LIMIT=250 bash benchmarks/run.sh --gpu-quick --skip tracing editing --sweep-methods memit ft-1 ft-5 \
    --sweep-points 8 --out-dir "$OUT/sweep"
GPU_QUICK_LIMIT=100 bash benchmarks/run.sh --gpu-quick --skip editing sweep --prompts 8 --naive 0 --profile 8 \
    --out-dir "$OUT/profile"
rm -f "$OUT/profile/report.md" "$OUT/profile/log.txt"  # report.json and profile.txt carry it
