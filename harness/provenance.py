"""The git commit a result was made from, also where there is no .git (the GPU machine gets a copy of the
working tree without it: ../shared/gpu/stage-model.sh writes the commit to .gpu/a/COMMIT beforehand)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = "SPEC_HARNESS_COMMIT"  # the commit itself, or a file holding it (the GPU scripts set it)
COMMIT_FILES = ("COMMIT", ".gpu/a/COMMIT")  # tried in order, relative to the repository root


def read_commit_file(path: Path) -> str | None:
    """First line of a COMMIT file; "+dirty" appended when a later line says dirty (stage-model.sh's format)."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    if not lines:
        return None
    return lines[0] + ("+dirty" if "dirty" in lines[1:] else "")


def git_commit(root: Path = ROOT) -> str | None:
    """$SPEC_HARNESS_COMMIT when set (the GPU scripts set it: the device's copy of the checkout can hold a stale
    .git); else `git rev-parse HEAD` in root; when git fails, root/COMMIT, then root/.gpu/a/COMMIT."""
    given = os.environ.get(ENV)
    if given:
        return read_commit_file(Path(given)) if Path(given).is_file() else given.strip()
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=root).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    for name in COMMIT_FILES:
        found = read_commit_file(root / name)
        if found:
            return found
    return None
