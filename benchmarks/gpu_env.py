"""The GPU machine's environment as one JSON file (command A's first stage; no model needed).

    python benchmarks/gpu_env.py --out results/gpu-env.json

Records the device (name, memory, SMs, capability), driver, CUDA / cuDNN / torch / transformers /
triton / Python versions, which SDPA kernels torch has enabled, the git commit (harness.provenance:
from COMMIT when there is no .git), and nvidia-smi's view. Works on a CPU too (CUDA fields are null).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness.provenance import git_commit


def smi(*fields: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import transformers
    import triton

    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               transformers=transformers.__version__, triton=triton.__version__, git_commit=git_commit(),
               host=platform.node(), cpus=torch.get_num_threads(), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
               command=" ".join(sys.argv))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version(),
                   driver=smi("driver_version"), smi=smi("name", "memory.total", "clocks.max.sm", "power.limit"),
                   sdpa_enabled=dict(flash=torch.backends.cuda.flash_sdp_enabled(),
                                     efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                                     cudnn=torch.backends.cuda.cudnn_sdp_enabled(),
                                     math=torch.backends.cuda.math_sdp_enabled()))
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = ap.parse_args(argv)
    env = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
