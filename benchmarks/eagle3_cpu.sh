#!/usr/bin/env bash
# Issue 14/15 on this project's CPU: the shipped eagle3 head, chains (fixed, and stopped on the head's
# confidence) and trees (4, 12 and 48 nodes), against ar in the same run; mt-bench (both turns, reported
# apart in turns.md) and humaneval. SmolLM2-135M-Instruct, fp32, greedy, the information-surplus meter off
# (a drafter-only comparison). Writes results/smollm2-mtbench-eagle3-cpu/ and
# results/smollm2-humaneval-eagle3-cpu/. VARIANTS=... replaces the drafter list (ar always runs first).
#
#   bash benchmarks/eagle3_cpu.sh            (about 10 minutes on 2 idle cores of the Intel Xeon, 25 on the AMD EPYC)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEFAULT="eagle3:k=2:total_tokens=0,eagle3:k=3:total_tokens=0,eagle3:k=4:total_tokens=0:stop_below=0.1"
DEFAULT+=",eagle3:depth=3:top_k=2:total_tokens=4,eagle3:depth=4:top_k=4:total_tokens=12"
DEFAULT+=",eagle3:depth=6:top_k=8:total_tokens=48"
VARIANTS=${VARIANTS:-$DEFAULT}
"$PY" -m harness run --target smollm2-135m --dtype float32 --temperature 0 --meter off \
    --suite mt-bench --per-category 1 --max-new-tokens 64 \
    --drafters "ar,$VARIANTS" \
    --run-id smollm2-mtbench-eagle3-cpu --overwrite "$@"
"$PY" benchmarks/turns.py results/smollm2-mtbench-eagle3-cpu
"$PY" -m harness report results/smollm2-mtbench-eagle3-cpu
"$PY" -m harness run --target smollm2-135m --dtype float32 --temperature 0 --meter off \
    --suite humaneval --limit 6 --max-new-tokens 96 --drafters "ar,$VARIANTS" \
    --run-id smollm2-humaneval-eagle3-cpu --overwrite "$@"
"$PY" -m harness report results/smollm2-humaneval-eagle3-cpu
