"""The hf backend under the oldest transformers we support (the lower bound in pyproject.toml).

The suite itself runs under the newest transformers that installs (the venv's). This test runs the
hf-backend tests again in a subprocess with the oldest version first on PYTHONPATH. `make test`
installs that version with `pip install --target` (see the Makefile, `transformers-oldest`) and
points SPEC_HARNESS_TRANSFORMERS_OLDEST at the folder; without the variable, the folder the
Makefile uses is tried, and the test is skipped when neither exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = "SPEC_HARNESS_TRANSFORMERS_OLDEST"
# The hf-backend tests: every test_targets test (both backends, tiny models) and the greedy decode loop
# through the hf backend.
SELECTION = ["tests/test_targets.py", "tests/test_decode.py", "-m", "not slow", "-k", "test_targets or hf"]


def oldest_supported() -> str:
    """X from the "transformers>=X" dependency of pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(r'"transformers>=([0-9][0-9.]*)[,"]', text)
    assert found, "pyproject.toml has no transformers>=X dependency"
    return found.group(1)


def oldest_dir() -> Path | None:
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        assert path.is_dir(), f"{ENV}={given} is not a folder: run `make transformers-oldest`"
        return path
    default = ROOT / ".venv" / f"transformers-{oldest_supported()}"
    return default if default.is_dir() else None


def test_hf_backend_under_oldest_transformers():
    folder = oldest_dir()
    if folder is None:
        pytest.skip(f"transformers {oldest_supported()} is not installed beside the venv: `make test` installs "
                    f"it (make transformers-oldest), or set {ENV}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, env=env, cwd=ROOT)
    assert version.returncode == 0, version.stderr[-2000:]
    wanted = oldest_supported()
    assert version.stdout.strip() in (wanted, wanted + ".0"), f"{folder} holds transformers {version.stdout}"
    # -W error::FutureWarning: nothing we call is deprecated in the oldest version either.
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::FutureWarning",
                          *SELECTION], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    passed = re.search(r"\b(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 13, res.stdout[-2000:]  # test_targets: 15 not slow; test_decode: the hf cases
