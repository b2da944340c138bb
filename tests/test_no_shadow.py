"""The package installs as `spec_kernels`, never as a top-level `kernels` (Hugging Face's kernel-hub
import name, which transformers probes)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json
spec = importlib.util.find_spec("kernels")
import spec_kernels
import transformers
print(json.dumps({
    "kernels_origin": None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or []))),
    "spec_kernels": spec_kernels.__file__,
    "transformers": transformers.__version__,
}))
"""


def test_no_top_level_kernels_module(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    origin = found["kernels_origin"]
    assert origin is None or str(REPO) not in origin, f"`kernels` resolves inside the repo: {origin}"
    assert Path(found["spec_kernels"]).resolve().parent == REPO / "kernels"
