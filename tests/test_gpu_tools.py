"""The GPU run's tools on a CPU: the attention probe, the kernel benchmark's measured bandwidth bound."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_attention_records_every_candidate(tmp_path, monkeypatch):
    monkeypatch.delenv("SPEC_HARNESS_ATTENTION", raising=False)
    probe = load("probe_attention")
    out = tmp_path / "probe"
    assert probe.main(["--device", "cpu", "--max-len", "64", "--tree", "8", "--prefill", "13", "--batch", "2",
                       "--reps", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "probe.csv")))
    names = set(probe.candidates())
    assert {r["candidate"] for r in rows} == names and len(rows) == len(names) * 5 * 2  # 5 shapes, 2 dtypes
    by = {(r["candidate"], r["dtype"], r["shape"]): r for r in rows}
    assert by["fold-cudnn", "float32", "decode"]["status"].startswith("error")  # a CUDA kernel, on a CPU
    assert by["manual", "bfloat16", "tree"]["status"] == "ok" and float(by["manual", "bfloat16", "tree"]["us"]) > 0
    assert float(by["manual", "float32", "decode"]["fresh_us"]) > 0  # timed on a key length of its own
    info = json.loads((out / "probe.json").read_text())
    assert info["choose_attention"] == {"bfloat16": "sdpa-gqa", "float32": "sdpa-gqa"}
    best = info["recommended"]
    assert all(by[best, "bfloat16", s]["status"] == "ok" for s in ("decode", "verify", "tree", "batch-decode", "prefill"))
    assert (out / "recommend.env").read_text() == f"SPEC_HARNESS_ATTENTION={best}\n"


def test_probe_flags_a_wrong_backend():
    probe = load("probe_attention")
    case = probe.case_inputs(1, 4, 32, 4, 2, 8, "cpu", torch.float32)
    wrong = probe.probe_one(lambda q, k, v, m: probe.attend(q, k, v, m, "manual") * 1.01, case, torch.device("cpu"),
                            torch.float32, reps=1)
    assert wrong["status"].startswith("wrong")
    rows = [dict(candidate=b, dtype="bfloat16", status="ok", us=1.0, graph="ok") for b in probe.BACKENDS]
    rows[0]["us"] = 0.5
    rows[1]["status"], rows[1]["us"] = "wrong: max difference 1", 0.1
    assert probe.recommend(rows, torch.device("cuda"), "bfloat16") == rows[0]["candidate"]
    rows[2]["us"] = 0.2
    rows[2]["fresh_us"] = 77000.0  # a plan per new key length (cuDNN on the H200)
    assert probe.recommend(rows, torch.device("cuda"), "bfloat16") == rows[0]["candidate"]
    assert probe.recommend(rows, torch.device("cpu"), "bfloat16") == rows[2]["candidate"]  # no plans to build there
    rows[0]["graph"] = "error: capture"
    assert probe.recommend(rows, torch.device("cuda"), "bfloat16") not in [r["candidate"] for r in rows[:3]]


def test_copy_bandwidth_is_measured():
    bench = load("bench_kernels")
    bw = bench.copy_bandwidth("cpu", mib=8, reps=3)
    assert 1e8 < bw < 1e13  # bytes read + written per second by a real copy on this machine
    assert not hasattr(bench, "HBM_BYTES_PER_S")  # no data-sheet constant left


@pytest.mark.slow  # torch.compile of a decoder layer on a 2-core CPU: about 40 s
def test_ar_floor_runs_every_method_on_cpu(tiny_dir, tmp_path):
    """bench_ar_floor with the compiled rows (a CPU has no graphs: the same steps run eagerly/compiled):
    every row decodes the same tokens as ar-eager, and the files it promises exist."""
    bench = load("bench_ar_floor")
    out = tmp_path / "floor"
    assert bench.main(["--target", str(tiny_dir), "--suite", "calibration", "--limit", "1", "--max-new-tokens", "6",
                       "--repeats", "1", "--device", "cpu", "--dtype", "float32", "--max-len", "256",
                       "--out", str(out)]) == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "ar_floor.csv"))}
    assert list(rows) == list(bench.METHODS)
    for m in ("ar-fast", "ar-compile", "hf-generate"):
        assert float(rows[m]["same_tokens_as_ar_eager"]) == 1.0, m
    assert float(rows["floor"]["x_floor"]) == 1.0 and float(rows["floor-compile"]["ms_per_token"]) > 0
    assert json.loads((out / "env.json").read_text())["benchmark"] == "bench_ar_floor"


def plan(script: str) -> tuple[dict, int]:
    text = subprocess.run(["bash", str(ROOT / "benchmarks" / script), "--plan"], capture_output=True, text=True,
                          check=True).stdout
    rows = [line.split() for line in text.splitlines()[1:]]
    stages = {name: (int(e), int(c)) for name, e, c in rows if name != "total"}
    return stages, int(rows[-1][2])


def test_gpu_plan_fits_the_device_limits():
    """A < 4 min, B < 8 min, both within 13; each stage's expected time under its cap; every stage the
    script runs has a planned cap (stage NAME lines against PLAN)."""
    (a, budget_a), (b, budget_b) = plan("gpu_a.sh"), plan("gpu_b.sh")
    assert budget_a <= 240 and budget_b <= 480 and budget_a + budget_b <= 13 * 60
    for stages, budget, script in ((a, budget_a, "gpu_a.sh"), (b, budget_b, "gpu_b.sh")):
        assert sum(e for e, _ in stages.values()) <= budget - 10  # 10 s kept for packing
        assert all(e <= c for e, c in stages.values())
        text = (ROOT / "benchmarks" / script).read_text()
        run = set(re.findall(r'^\s*stage "?([a-z0-9-]+)"? ', text, re.M)) | ({"profile-graph", "profile-compile",
                                                                          "profile-eager"} if "$name" in text else set())
        run.discard("$name")
        assert run == set(stages), (script, run ^ set(stages))
    assert list(b)[:2] == ["convert", "mtbench"]  # most important first: issue 14's GPU line


def test_gpu_lib_stages_publish_as_they_end(tmp_path):
    """The shared stage runner: ok / FAILED / TIMED OUT / SKIPPED in summary.log, and $OUT holds the packed
    results after every stage, so a command killed at its limit returns what finished."""
    script = tmp_path / "gpu_t.sh"
    script.write_text(f"""NAME=t
BUDGET=40
PLAN=("good:1:5" "bad:1:5" "slow:1:2" "late:1:5")
KEY_FILES=(good/result.txt)
source {ROOT}/benchmarks/gpu_lib.sh "$@"
stage good bash -c 'mkdir -p "$0/good" && echo 42 > "$0/good/result.txt"' "$RES"
test -f "$OUT/good.result.txt" && test -f "$OUT/results-t.tar.gz" && log "published after good"
stage bad bash -c 'echo boom >&2; exit 3'
stage slow sleep 30
START=$((START - 100))
stage late true
""")
    out, res = tmp_path / "out", tmp_path / "res"
    env = dict(os.environ, OUT=str(out), GPU_RESULTS=str(res), GPU_MODEL_DIR=str(tmp_path / "m"),
               GPU_SITE=str(tmp_path / "site"), GPU_DEVICE="cpu", PYTHON=sys.executable)
    subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    log = (out / "summary-t.log").read_text()
    assert "good: ok" in log and "published after good" in log
    assert "bad: FAILED (exit 3" in log and "boom" in log
    assert "slow: TIMED OUT" in log and "late: SKIPPED" in log and "finished in" in log
    assert (out / "good.result.txt").read_text() == "42\n"
    names = subprocess.run(["tar", "-tzf", str(out / "results-t.tar.gz")], capture_output=True, text=True).stdout
    assert "./good/result.txt" in names and "./logs/bad.log" in names
    assert not list(out.glob("*.part"))


def test_count_draft_ops_counts_per_call(capsys):
    """benchmarks/count_draft_ops.py: a longer chain dispatches more operations per proposal."""
    counter = load("count_draft_ops")
    per_call = {}
    for k in (1, 3):
        assert counter.main(["--k", str(k), "--new-tokens", "12"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("propose"))
        per_call[k] = float(line.split()[3])
    assert 0 < per_call[1] < per_call[3]
