#!/usr/bin/env bash
# The main job: set up, then trace a fact and edit it on the bundled SmolLM2-135M model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/tracekit demo --out out/demo "$@"
