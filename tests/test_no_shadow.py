"""The package installs as `spec_kernels`, never as a top-level `kernels`: that is the import name of
Hugging Face's kernel hub, which transformers >= 5.25 requires and imports. Run from the checkout's root
(`python -m ...`), the kernels/ folder is on sys.path under that name; it must hand the name over."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = REPO / "kernels" / "__init__.py"

PROBE = """
import importlib.util, json
spec = importlib.util.find_spec("kernels")
import kernels
import spec_kernels
import transformers
from transformers.activations import ACT2FN  # imports transformers.integrations.hub_kernels
print(json.dumps({
    "kernels_file": getattr(kernels, "__file__", None),
    "kernels_has_our_api": hasattr(kernels, "verify_chain"),
    "spec_kernels": spec_kernels.__file__,
    "transformers": transformers.__version__,
}))
"""


def _probe(cwd, code=PROBE):
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(found):
    assert found["kernels_file"] is None or Path(found["kernels_file"]).resolve() != OURS, \
        f"`kernels` is this repo's folder: {found['kernels_file']}"
    assert not found["kernels_has_our_api"]
    assert Path(found["spec_kernels"]).resolve() == OURS


def test_no_top_level_kernels_module(tmp_path):
    _check(_probe(tmp_path))


def test_the_checkout_root_on_sys_path_does_not_shadow_the_kernel_hub():
    # `python -c` puts the working directory first on sys.path, as `python -m harness` from the root does.
    _check(_probe(REPO))


def test_without_the_kernel_hub_the_folder_imports_as_an_empty_module(tmp_path):
    # Only the checkout and the standard library on sys.path: no hub to hand over to.
    code = f"""
import sys, json
sys.path[:] = [{str(REPO)!r}] + [p for p in sys.path if "-packages" not in p and p not in ("", ".")]
import kernels
print(json.dumps({{"attrs": sorted(a for a in vars(kernels) if not a.startswith("_")),
                   "version": getattr(kernels, "__version__", None)}}))
"""
    found = _probe(tmp_path, code)
    assert found == {"attrs": [], "version": None}
