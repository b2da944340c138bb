#!/usr/bin/env bash
# Command A of the GPU run (benchmarks/gpu_stage.md): carries .gpu/a (the model's first half, the wheels,
# COMMIT) and does everything that needs no model, most important first:
#   env      benchmarks/gpu_env.py: device, driver, versions, SDPA switches, git commit -> gpu-env.json
#   probe    benchmarks/probe_attention.py on SmolLM2's exact shapes: each attention backend works or its
#            error, difference from float32, kernels launched, CUDA-graph capture; recommend.env (read by B)
#   test     pytest -m gpu (CUDA graphs, attention choice, kernels against the reference, statistics)
#   kernels  benchmarks/bench_kernels.py: the grid, bound from a copy measured on the device
# It also copies .gpu/a (benchmarks/gpu_pack.sh) into $GPU_MODEL_DIR (/tmp/m) and installs the wheels into /tmp/site for command B.
# `bash benchmarks/gpu_a.sh --plan` prints the stages' expected time and caps; see benchmarks/gpu_lib.sh.
NAME=a
BUDGET=${GPU_BUDGET_S:-180}
PLAN=("env:10:20" "probe:35:50" "test:85:100" "kernels:40:55")
KEY_FILES=(gpu-env.json attention-probe/probe.csv attention-probe/recommend.env kernels/summary.csv)
# shellcheck source=benchmarks/gpu_lib.sh
source "$(dirname "$0")/gpu_lib.sh" "$@"

mkdir -p "$MODEL_DIR"
if [ -d .gpu/a ]; then
    cp .gpu/a/* "$MODEL_DIR"/ && log "setup: .gpu/a copied to $MODEL_DIR for command B"
else
    log "setup: no .gpu/a here (stage it: benchmarks/gpu_stage.md); command B will have no model"
fi
install_wheels

stage env "$PY" benchmarks/gpu_env.py --out "$RES/gpu-env.json"
# shellcheck disable=SC2086
stage probe "$PY" benchmarks/probe_attention.py --device "$DEVICE" --reps 10 --out "$RES/attention-probe" ${PROBE_ARGS:-}
stage test "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs --junitxml "$RES/pytest-gpu.xml"
stage kernels "$PY" benchmarks/bench_kernels.py --out "$RES/kernels" --budget-s 25
