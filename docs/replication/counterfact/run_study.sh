#!/usr/bin/env bash
# The CounterFact study of issue 13 on the bundled model, in the background, resumable, with
# committed checkpoints. Run from the repository root:
#
#   nohup bash docs/replication/counterfact/run_study.sh > runs/counterfact.log 2>&1 &
#
# Every step computes only what the live store lacks, so rerunning the script after a crash (or
# on a fresh clone, from the last committed checkpoint) resumes where it stopped. See PLAN.md for
# the sizes, the measured costs and what must be merged first.
#
#   LIVE=<the running sweep's live store> bash docs/replication/counterfact/run_study.sh save
#
# run in the checkout that must keep the work (main, before a session stops), copies the live
# stores onto RESUME / RESUME_TK there and commits them: a sweep whose own checkout is lost resumes
# from them, since a fresh start takes whichever of RESUME and SNAP holds more results.
#
# Settings (environment): SHARED_DATA (../shared/data), MODEL (smollm2-135m), N_EI (120 known
# points for Error Injection), N_OTHER (40 for the other problems), N_FF (120, at least N_OTHER: Fact Forcing
# with FT-1 and FT-5, the paper's one positive cell, grows to as many points as Error Injection last), EI_LAYERS (auto: 8 spread + the
# default layer), OTHER_LAYERS ("0 3 8 17 25"), WINDOW / ROBUST_WINDOW (tracing windows, 5 / 10),
# WORKERS (2 processes side by side, sharing each step's items: --shard shared), BATCH / SCORE_BATCH (points edited together / of those,
# scored in one pass: 8 / 1, benchmarks/results/editing-cpu-batch-8-score-1.md), EVERY (seconds between checkpoints, 1800), COMMIT (1: commit
# each checkpoint to git; 0: only copy it), LIVE / SNAP (live store / committed snapshot), LIVE_TK /
# SNAP_TK (the same for Fact Forcing with ROME and MEMIT under tracekit's noise convention), RESUME /
# RESUME_TK (what `save` writes: checkpoint.sqlite / checkpoint-ff-tracekit-noise.sqlite beside SNAP;
# SNAP stays the store the committed analysis was made from), EXTRA (more options for every recipe,
# e.g. --no-known-filter for a smoke test on a random model).
set -euo pipefail
cd "$(dirname "$0")/../../.."

PY=${PY:-.venv/bin/python}
SHARED_DATA=$(realpath -m "${SHARED_DATA:-../shared/data}")
MODEL=${MODEL:-smollm2-135m}
N_EI=${N_EI:-120}
N_OTHER=${N_OTHER:-40}
N_FF=${N_FF:-120}
EI_LAYERS=${EI_LAYERS:-auto}
OTHER_LAYERS=${OTHER_LAYERS:-0 3 8 17 25}
WINDOW=${WINDOW:-5}
ROBUST_WINDOW=${ROBUST_WINDOW:-10}
WORKERS=${WORKERS:-2}
BATCH=${BATCH:-8}
SCORE_BATCH=${SCORE_BATCH:-1}
EVERY=${EVERY:-1800}
COMMIT=${COMMIT:-1}
LIVE=${LIVE:-runs/counterfact.sqlite}
SNAP=${SNAP:-docs/replication/counterfact/store.sqlite}
LIVE_TK=${LIVE_TK:-runs/counterfact-ff-tracekit-noise.sqlite}
SNAP_TK=${SNAP_TK:-docs/replication/counterfact/store-ff-tracekit-noise.sqlite}
RESUME=${RESUME:-$(dirname "$SNAP")/checkpoint.sqlite}
RESUME_TK=${RESUME_TK:-$(dirname "$SNAP_TK")/checkpoint-ff-tracekit-noise.sqlite}
EXTRA=${EXTRA:-}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1

copy_store() {  # a consistent copy of a live SQLite store (the online backup API), never a torn file
    "$PY" -c 'import sqlite3, sys; d = sqlite3.connect(sys.argv[2]); sqlite3.connect(sys.argv[1]).backup(d); d.close()' "$1" "$2"
}

counts() {  # "<n> traces, <n> edits" (status ok) in a store; with --total, their sum (0: no store)
    "$PY" -c 'import os, sqlite3, sys
have, n = set(), {}
if os.path.exists(sys.argv[1]):
    c = sqlite3.connect(sys.argv[1])
    have = {t for (t,) in c.execute("SELECT name FROM sqlite_master")}
    n = {t: c.execute(f"SELECT count(*) FROM {t} WHERE status = ?", ("ok",)).fetchone()[0]
         for t in ("traces", "edits") if t in have}
print(sum(n.values()) if sys.argv[2:] else ", ".join(f"{v} {t}" for t, v in n.items()) or "nothing yet")' "$@"
}

fuller() {  # the store of the two that holds more results (the first on a tie)
    if [ "$(counts "$2" --total)" -gt "$(counts "$1" --total)" ]; then echo "$2"; else echo "$1"; fi
}

commit_stores() {  # $1: message prefix; then the stores
    local message=$1; shift
    [ "$COMMIT" = 1 ] || return 0
    git add "$@" && git commit -q -m "$message: $(counts "$1")" -- "$@" || true
}

checkpoint() {
    copy_store "$LIVE" "$SNAP"
    [ ! -f "$LIVE_TK" ] || copy_store "$LIVE_TK" "$SNAP_TK"
    echo "$(date +%FT%T) checkpoint: $(counts "$SNAP")"
    local snaps=("$SNAP")
    [ ! -f "$SNAP_TK" ] || snaps+=("$SNAP_TK")
    commit_stores "CounterFact store checkpoint" "${snaps[@]}"
}

if [ "${1:-}" = save ]; then  # keep a running sweep's results where its own checkout may be lost
    saved=()
    for pair in "$LIVE:$RESUME:$SNAP" "$LIVE_TK:$RESUME_TK:$SNAP_TK"; do
        IFS=: read -r live resume snap <<< "$pair"
        [ -f "$live" ] || continue
        if [ "$(fuller "$snap" "$live")" = "$live" ]; then  # nothing the committed store lacks: no copy
            copy_store "$live" "$resume"
            saved+=("$resume")
            echo "$resume: $(counts "$resume")"
        fi
    done
    [ ${#saved[@]} -eq 0 ] || commit_stores "CounterFact study: a running sweep's results" "${saved[@]}"
    exit 0
fi

# The data folder: CounterFact (436 records, ROME's format), known_1000 (the s3 noise scale) and
# WikiText-2 (wikitext/wikitext-2-raw-v1.test.raw), which the key statistics find there: no
# statistics from the model's own samples.
[ "$N_FF" -ge "$N_OTHER" ] || { echo "N_FF ($N_FF) must be at least N_OTHER ($N_OTHER)"; exit 2; }
[ -f "$SHARED_DATA/wikitext/wikitext-2-raw-v1.test.raw" ] || { echo "no WikiText-2 in $SHARED_DATA/wikitext"; exit 2; }
mkdir -p "$(dirname "$LIVE")"
export TRACEKIT_DATA=$SHARED_DATA

# Resume from the fuller of the last committed checkpoint and a saved running sweep.
for pair in "$LIVE:$SNAP:$RESUME" "$LIVE_TK:$SNAP_TK:$RESUME_TK"; do
    IFS=: read -r live snap resume <<< "$pair"
    origin=$(fuller "$snap" "$resume")
    [ -f "$live" ] || [ ! -f "$origin" ] || copy_store "$origin" "$live"
done
(while sleep "$EVERY"; do checkpoint; done) &
TICKER=$!
trap 'kill $TICKER 2>/dev/null || true' EXIT

COMMON=(--model "$MODEL" --dataset counterfact --store "$LIVE" --quiet $EXTRA)
COMMON_TK=(--model "$MODEL" --dataset counterfact --store "$LIVE_TK" --quiet $EXTRA)
ALL_METHODS=(--methods rome memit ft-1 ft-5)
EDIT=(--batch "$BATCH" --score-batch "$SCORE_BATCH")

# Workers share the items of every step through the store (--shard shared: each claims the next items
# nobody holds), so none idles while another has work left; a static hash split of the 40 points gave
# one of two shards 25 of them, and so hours of Fact Forcing alone.
SHARED=(--shard shared)

one_worker() {  # steps 1-7, in order: a worker that ends a step goes on to the next
    local tag="worker $1/$WORKERS"
    echo "$(date +%FT%T) $tag 1/11 MLP tracing, window $WINDOW, first $N_EI known points"
    "$PY" recipes/trace_dataset.py "${COMMON[@]}" "${SHARED[@]}" --n-known "$N_EI" --kinds mlp --windows "$WINDOW" \
        --samples 10
    echo "$(date +%FT%T) $tag 2/11 Error Injection, 4 methods x layers $EI_LAYERS x $N_EI points"
    "$PY" recipes/edit_sweep.py "${COMMON[@]}" "${EDIT[@]}" "${SHARED[@]}" --n-known "$N_EI" "${ALL_METHODS[@]}" \
        --problems error-injection --layers $EI_LAYERS
    # The other problems, cheapest cells first. Fact Forcing runs whole passes under noise drawn afresh
    # for every pass (the paper code's convention): about 40 CPU s an FT item and 60-80 a ROME or MEMIT
    # item, against 7-12 for the other problems. So every cell reaches its 40 points first (steps 3-7),
    # and Fact Forcing with FT grows to N_FF points last (step 10).
    echo "$(date +%FT%T) $tag 3/11 Tracing Reversal, Fact Erasure, Fact Amplification, 4 methods x layers $OTHER_LAYERS x $N_OTHER points"
    "$PY" recipes/edit_sweep.py "${COMMON[@]}" "${EDIT[@]}" "${SHARED[@]}" --n-known "$N_OTHER" "${ALL_METHODS[@]}" \
        --problems tracing-reversal fact-erasure fact-amplification --layers $OTHER_LAYERS
    # Before Fact Forcing: the window-10 traces are cheap (about 40 CPU s a point) and the robustness
    # tables of the four finished problems wait on them.
    echo "$(date +%FT%T) $tag 4/11 robustness traces: MLP window $ROBUST_WINDOW"
    "$PY" recipes/trace_dataset.py "${COMMON[@]}" "${SHARED[@]}" --n-known "$N_EI" --kinds mlp \
        --windows "$ROBUST_WINDOW" --samples 10
    echo "$(date +%FT%T) $tag 5/11 Fact Forcing with FT-1 and FT-5, layers $OTHER_LAYERS x $N_OTHER points"
    fact_forcing_ft "$N_OTHER"
    # Under the paper code's noise ROME's and MEMIT's Fact Forcing edits do not carry over to the
    # scoring passes (PLAN.md): every score at the floor, no R² to fit. The same cells under tracekit's
    # single draw, in a store of their own (a store holds one convention), say what tracing predicts
    # where these edits can succeed; cheap (the noise is fixed, so v* reuses its recorded pass), so
    # before the paper code's.
    echo "$(date +%FT%T) $tag 6/11 Fact Forcing with ROME and MEMIT, tracekit's noise convention, layers $OTHER_LAYERS x $N_OTHER points"
    "$PY" recipes/edit_sweep.py "${COMMON_TK[@]}" "${EDIT[@]}" "${SHARED[@]}" --n-known "$N_OTHER" \
        --methods rome memit --problems fact-forcing --layers $OTHER_LAYERS --convention tracekit
    echo "$(date +%FT%T) $tag 7/11 Fact Forcing with ROME and MEMIT, layers $OTHER_LAYERS x $N_OTHER points"
    "$PY" recipes/edit_sweep.py "${COMMON[@]}" "${EDIT[@]}" "${SHARED[@]}" --n-known "$N_OTHER" --methods rome memit \
        --problems fact-forcing --layers $OTHER_LAYERS
    echo "$(date +%FT%T) $tag steps 1-7 done"
}

fact_forcing_ft() {  # $1: points
    "$PY" recipes/edit_sweep.py "${COMMON[@]}" "${EDIT[@]}" "${SHARED[@]}" --n-known "$1" --methods ft-1 ft-5 \
        --problems fact-forcing --layers $OTHER_LAYERS
}

more_fact_forcing_ft() {  # step 10 for one worker
    echo "$(date +%FT%T) worker $1/$WORKERS 10/11 Fact Forcing with FT-1 and FT-5, layers $OTHER_LAYERS x $N_FF points"
    fact_forcing_ft "$N_FF"
}

in_workers() {  # "$@" k for every worker k, side by side; fail if any fails
    local pids=() k pid
    for ((k = 0; k < WORKERS; k++)); do
        "$@" "$k" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

analyse() {  # $1: the points of Fact Forcing with FT so far
    local out=("$(dirname "$SNAP")/analysis" "$(dirname "$SNAP")/analysis-ff-tracekit-noise")
    "$PY" recipes/analyse.py --store "$LIVE" --out "${out[0]}" --by-relation --window "$WINDOW" \
        --title "Replication analysis: CounterFact ($N_EI / $N_OTHER known points; Fact Forcing with FT: $1), $MODEL"
    # The tracekit-noise Fact Forcing cells with the main store's traces (its edits of the same cells,
    # listed second, are left out: the first store given wins).
    "$PY" recipes/analyse.py --store "$LIVE_TK" "$LIVE" --problems fact-forcing --methods rome memit \
        --out "${out[1]}" --by-relation --window "$WINDOW" \
        --title "Fact Forcing with ROME and MEMIT under tracekit's noise convention: CounterFact ($N_OTHER known points), $MODEL"
    checkpoint
    if [ "$COMMIT" = 1 ]; then
        git add "${out[@]}" && git commit -q -m "CounterFact analysis (Fact Forcing with FT: $1 points)" -- "${out[@]}" || true
    fi
}

in_workers one_worker
checkpoint
echo "$(date +%FT%T) 8/11 representation zeroing, window $WINDOW (seconds)"
"$PY" recipes/trace_dataset.py "${COMMON[@]}" --n-known "$N_EI" --kinds zero --windows "$WINDOW"
checkpoint
echo "$(date +%FT%T) 9/11 analysis: every cell at its minimum size"
analyse "$N_OTHER"
if [ "$N_FF" -gt "$N_OTHER" ]; then
    in_workers more_fact_forcing_ft
    checkpoint
    echo "$(date +%FT%T) 11/11 analysis with Fact Forcing with FT on $N_FF points"
    analyse "$N_FF"
fi
echo "$(date +%FT%T) done"
