"""`spec-harness profile` on a tiny model: a loadable Chrome trace with the phase regions, and a phase table."""

import csv
import json

import pytest
import torch

from harness.cli import main
from harness.profile import REGIONS, RegionClock


def test_profile_writes_trace_and_phase_table(tiny_dir, tmp_path, capsys):
    out = tmp_path / "prof"
    rc = main(["profile", "--target", str(tiny_dir), "--drafter", "layerskip", "--layerskip-layers", "2",
               "--steps", "5", "--k", "3", "--suite", "calibration", "--device", "cpu", "--max-len", "512",
               "--fast", "--out", str(out)])
    assert rc == 0
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert set(REGIONS) <= names
    rows = {r["region"]: r for r in csv.DictReader(open(out / "phase_times.csv"))}
    assert list(rows) == list(REGIONS)
    assert all(int(rows[p]["calls"]) == 5 for p in ("draft", "verify", "accept", "other"))
    assert int(rows["cache update"]["calls"]) > 5 and float(rows["verify"]["cpu_ms"]) > 0
    info = json.loads((out / "profile.json").read_text())
    assert info["steps"] == 5 and info["fast"] is True and info["drafter"] == "layerskip"
    printed = capsys.readouterr().out
    assert "chrome://tracing" in printed and "cache update" in printed


def test_profile_refuses_peers(tiny_dir, tmp_path, capsys):
    rc = main(["profile", "--target", str(tiny_dir), "--drafter", "hf-generate", "--device", "cpu",
               "--max-len", "512", "--out", str(tmp_path / "p")])
    assert rc == 2 and "no steps to profile" in capsys.readouterr().err


def test_region_clock_checks_phase_order():
    clock = RegionClock(torch.device("cpu"))
    clock.start()
    clock.mark("draft")
    with pytest.raises(RuntimeError, match="expected"):
        clock.mark("accept")
