#!/usr/bin/env bash
# The kernels' GPU checks and benchmark in one command, on the GPU machine, from anywhere:
#
#   bash benchmarks/kernels_gpu.sh            results under ${OUT:-results}/kernels/
#
# 1. pytest -m gpu on the kernel tests: the Triton kernels on CUDA against the float64 reference,
#    the statistical (losslessness) tests on the kernels, V = 262144.
# 2. pytest-benchmark on representative cases (JSON beside the summary).
# 3. benchmarks/bench_kernels.py: the full grid -> summary.csv, env.json, and a printed table.
# TRITON_INTERPRET is forced to 0: tests/conftest.py defaults it to 1 for CPU runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
DEST="${OUT:-results}/kernels"
mkdir -p "$DEST"
export TRITON_INTERPRET=0
status=0
"$PY" -m pytest -m gpu -q -x tests/test_kernels_chain.py tests/test_kernels_tree.py tests/test_kernels_stats.py \
    2>&1 | tee "$DEST/pytest_gpu.log" || status=1
"$PY" -m pytest -q benchmarks/bench_kernels.py --benchmark-json="$DEST/pytest_benchmark.json" \
    2>&1 | tee "$DEST/pytest_benchmark.log" || status=1
"$PY" benchmarks/bench_kernels.py --out "$DEST" 2>&1 | tee "$DEST/bench.log" || status=1
exit $status
