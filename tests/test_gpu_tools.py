"""The GPU run's tools on a CPU: the attention probe, the kernel benchmark's measured bandwidth bound."""

import csv
import importlib.util
import json
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
    rows[0]["graph"] = "error: capture"
    assert probe.recommend(rows, torch.device("cuda"), "bfloat16") not in (rows[0]["candidate"], rows[1]["candidate"])


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
