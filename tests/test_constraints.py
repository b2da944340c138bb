"""constraints.txt (the versions `make test` last passed with, which the Makefile installs) stays inside
pyproject.toml's ranges, and pins every declared dependency but torch and triton."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            out[canonicalize_name(name)] = version
    return out


def test_constraints_lie_inside_pyproject_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    have = pins()
    for req in declared:
        name = canonicalize_name(req.name)
        if name in ("torch", "triton"):
            assert name not in have  # the Makefile picks torch's CPU or CUDA build, and torch its triton
            continue
        assert name in have, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(have[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={have[name]}, outside pyproject's {req.specifier}"
