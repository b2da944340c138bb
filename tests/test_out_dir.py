"""Output folders that cannot be created or written are refused in one line, before any model loads.

Every command below is given a target that does not exist: the error names --out (not the target), which
shows the folder was checked first. /proc refuses new entries even to root, so the permission cases
hold whoever runs the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import UserError
from harness.records import check_out_dir, check_out_file

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
NO_TARGET = "/nonexistent/i18-target"


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "taken.txt"
    path.write_text("x")
    return path


def test_a_creatable_folder_passes_and_nothing_is_left(tmp_path):
    check_out_dir(tmp_path / "a" / "b")
    check_out_dir(tmp_path)
    check_out_file(tmp_path / "new" / "x.json")
    assert sorted(os.listdir(tmp_path)) == []


def test_a_file_in_the_way(a_file):
    with pytest.raises(UserError, match=r"--out .*taken.txt is a file, not a folder: remove it or choose another --out"):
        check_out_dir(a_file)
    with pytest.raises(UserError, match=r"cannot be created: .*taken.txt is a file"):
        check_out_dir(a_file / "run")
    with pytest.raises(UserError, match=r"is a folder: give the path of a file"):
        check_out_file(a_file.parent)
    with pytest.raises(UserError, match=r"taken.txt is a file"):
        check_out_file(a_file / "cal.json")


@needs_proc
def test_not_writable_and_not_creatable():
    with pytest.raises(UserError, match=r"--out /proc/self is not writable \(.*\): choose a folder you can write to"):
        check_out_dir(Path("/proc/self"))
    with pytest.raises(UserError, match=r"--out /proc/i18-out/run cannot be created in /proc \("):
        check_out_dir(Path("/proc/i18-out/run"))


def commands(a_file: Path, run_dir: Path) -> dict[str, list[str]]:
    """Each command that writes a folder or file, with --out (or its run folder) behind a file."""
    bad = str(a_file / "sub")
    return {
        "run": ["run", "--target", NO_TARGET, "--suite", "mini", "--limit", "1", "--out", bad],
        "run-processes": ["run", "--target", NO_TARGET, "--suite", "mini", "--out", bad, "--run-id", "r",
                          "--processes", "2", "--device", "cpu"],
        "report": ["report", str(run_dir), "--out", bad],
        "export-specbench": ["export-specbench", str(run_dir), "--out", bad],
        "train-head": ["train-head", "--target", NO_TARGET, "--out", bad],
        "calibrate": ["calibrate", "--target", NO_TARGET, "--drafter", "ngram", "--out", f"{bad}/cal.json"],
        "profile": ["profile", "--target", NO_TARGET, "--drafter", "ngram", "--out", bad],
        "probe": ["probe", "--target", NO_TARGET, "--text", str(a_file), "--out", bad],
    }


@pytest.mark.parametrize("name", ["run", "run-processes", "report", "export-specbench", "train-head",
                                  "calibrate", "profile", "probe"])
def test_every_command_checks_out_first(name, a_file, tmp_path, capsys):
    from test_summary import basic_run

    run_dir = basic_run(tmp_path / "run")
    assert main(commands(a_file, run_dir)[name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spec-harness: error: --out ") and "taken.txt is a file" in err, err
    assert "\n" not in err


def test_fit_base_checks_out_first(a_file, tmp_path, capsys):
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"ids": [1, 2, 3, 4]}\n')
    assert main(["fit-base", "--ids", str(ids), "--vocab-size", "8", "--out", str(a_file / "b.safetensors")]) == 2
    assert "taken.txt is a file" in capsys.readouterr().err


@needs_proc
def test_run_exits_2_in_one_line_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "harness", "run", "--target", NO_TARGET, "--suite", "mini",
                          "--out", "/proc/i18-results"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be created in /proc" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
