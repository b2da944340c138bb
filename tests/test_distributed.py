"""Multi-process runs (harness.distributed) on the CPU: `spec-harness run --processes 2` starts accelerate's
torchrun launcher and the two processes talk over gloo. The reference is a single-process run of the same
prompts, with one thread as each launched process has, so the tokens at temperature 0 are the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness import distributed
from harness.cli import build_parser, main
from harness.config import RunConfig
from harness.errors import UserError
from harness.records import read_jsonl
from harness.targets import load_target

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300
SAME_IN_SUMMARY = ("drafter", "category", "prompts", "new_tokens", "steps", "tau", "mean_accepted", "accept_rate",
                   "diverged", "acc_uncond_1", "acc_cond_1")


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("questions") / "question.jsonl"
    rows = [dict(question_id=i, category=("chat", "code")[i % 2], turns=[f"Question {i}: say something about {w}."])
            for i, w in enumerate(("rivers", "lists", "clouds", "loops"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def common(tiny_dir, questions, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("results")
    return ["--target", str(tiny_dir), "--prompts", str(questions), "--drafters", "ar,ngram",
            "--max-new-tokens", "12", "--meter", "off", "--warmup", "0", "--out", str(out)]


@pytest.fixture(scope="module")
def single(common) -> Path:
    """The reference: a single-process run, in this process, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", *common, "--run-id", "single"]) == 0
    finally:
        torch.set_num_threads(threads)
    return Path(common[common.index("--out") + 1]) / "single"


def spec_harness(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`spec-harness ARGV` in a fresh process (python -m harness is the same entry point)."""
    full_env = {k: v for k, v in os.environ.items() if k != distributed.FAIL_ENV}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "harness", *argv], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S, check=False)


def outputs(run_dir: Path) -> list[tuple]:
    return [(r["drafter"], r["prompt_id"], r["output_ids"]) for r in read_jsonl(run_dir / "prompts.jsonl")]


def test_two_processes_match_a_single_process(common, single):
    proc = spec_harness("run", "--processes", "2", *common, "--run-id", "two")
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = single.parent / "two"
    assert not (two / "shards").exists()  # merged, then removed

    # same records in the same order (prompt, then drafter), same tokens
    assert outputs(two) == outputs(single)
    prompts, steps = list(read_jsonl(two / "prompts.jsonl")), list(read_jsonl(two / "steps.jsonl"))
    assert [r["rank"] for r in prompts] == [0, 0, 1, 1, 0, 0, 1, 1]  # round-robin by prompt index
    assert {r["rank"] for r in steps} == {0, 1}
    assert all(int(r["prompt_id"]) % 2 == r["rank"] for r in steps)
    assert [(s["drafter"], s["prompt_id"], s["accepted"]) for s in steps] == \
        [(s["drafter"], s["prompt_id"], s["accepted"]) for s in read_jsonl(single / "steps.jsonl")]

    a, b = pd.read_csv(single / "summary.csv"), pd.read_csv(two / "summary.csv")
    pd.testing.assert_frame_equal(a[list(SAME_IN_SUMMARY)], b[list(SAME_IN_SUMMARY)])

    env = json.loads((two / "env.json").read_text())
    assert env["processes"] == 2 and [r["rank"] for r in env["ranks"]] == [0, 1]
    assert "--processes 2" in env["command"]


def test_failed_rank_keeps_the_others_and_resume_finishes(common, single, monkeypatch, capfd):
    """`spec-harness run --processes 2` called in this process (it saves a Python start per launch; the
    ranks are still launched by accelerate in processes of their own)."""
    argv = ["run", "--processes", "2", *common, "--run-id", "failed"]
    monkeypatch.setenv(distributed.FAIL_ENV, "1:1")  # rank 1 fails after its first prompt
    assert main(argv) != 0
    assert "injected failure of rank 1" in capfd.readouterr().err
    monkeypatch.delenv(distributed.FAIL_ENV)
    run_dir = single.parent / "failed"
    shards = run_dir / "shards"

    # rank 0 finished its two prompts with both drafters; rank 1 kept the one prompt it finished
    rank0 = list(read_jsonl(shards / "rank0" / "prompts.jsonl"))
    assert [(r["drafter"], r["prompt_id"], r["rank"]) for r in rank0] == \
        [("ar", "0", 0), ("ngram", "0", 0), ("ar", "2", 0), ("ngram", "2", 0)]
    assert [(r["drafter"], r["prompt_id"]) for r in read_jsonl(shards / "rank1" / "prompts.jsonl")] == [("ar", "1")]
    assert json.loads((shards / "rank0" / "status.json").read_text())["finished"] is True
    assert json.loads((shards / "rank1" / "status.json").read_text())["finished"] is False
    before = list(read_jsonl(run_dir / "prompts.jsonl"))  # the merge of what finished
    assert len(before) == 5

    assert main([*argv, "--resume"]) == 0, capfd.readouterr().err[-4000:]
    after = list(read_jsonl(run_dir / "prompts.jsonl"))
    assert set(Counter((r["drafter"], r["prompt_id"]) for r in after).values()) == {1}
    assert all(rec in after for rec in before)  # finished prompts were kept, not decoded again
    assert outputs(run_dir) == outputs(single)
    assert not shards.exists()
    a, b = pd.read_csv(single / "summary.csv"), pd.read_csv(run_dir / "summary.csv")
    pd.testing.assert_frame_equal(a[list(SAME_IN_SUMMARY)], b[list(SAME_IN_SUMMARY)])


def _prompt(drafter, pid, rank):
    return dict(drafter=drafter, prompt_id=pid, rank=rank, new_tokens=2, wall_s=0.1, output_ids=[[1, 2]])


def _step(drafter, pid, rank, step):
    return dict(drafter=drafter, prompt_id=pid, rank=rank, turn=0, step=step, accepted=0, emitted=1)


def _write(path: Path, records, tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


def test_resume_pools_shards_of_a_killed_run_and_deals_them_to_a_new_world(questions, tmp_path):
    """A run of 2 processes killed hard: rank 1 left the steps of an unfinished prompt and half a line.
    Resuming with 3 processes merges what finished and deals it out by prompt index % 3."""
    out = tmp_path / "run"
    _write(out / "shards/rank0/prompts.jsonl", [_prompt("ar", "0", 0), _prompt("ngram", "0", 0)])
    _write(out / "shards/rank0/steps.jsonl", [_step("ar", "0", 0, 0), _step("ngram", "0", 0, 0)])
    _write(out / "shards/rank1/prompts.jsonl", [_prompt("ar", "3", 1), _prompt("ar", "1", 1)], tail='{"drafter": "ng')
    _write(out / "shards/rank1/steps.jsonl", [_step("ar", "1", 1, 0), _step("ar", "3", 1, 0), _step("ngram", "1", 1, 0)])
    order = distributed.Order(RunConfig(suite=str(questions), drafters=("ngram", "ar")))

    distributed.deal(out, order, world=3)

    merged = [(r["drafter"], r["prompt_id"]) for r in read_jsonl(out / "prompts.jsonl")]
    assert merged == [("ar", "0"), ("ngram", "0"), ("ar", "1"), ("ar", "3")]
    assert [(s["drafter"], s["prompt_id"]) for s in read_jsonl(out / "steps.jsonl")] == merged  # no unfinished steps
    dealt = {k: [(r["drafter"], r["prompt_id"]) for r in read_jsonl(out / f"shards/rank{k}/prompts.jsonl")]
             for k in range(3)}
    assert dealt == {0: [("ar", "0"), ("ngram", "0"), ("ar", "3")], 1: [("ar", "1")], 2: []}
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank0", "rank1", "rank2"]


def test_forwarded_argv_reads_back_without_processes():
    parser = build_parser()
    args = parser.parse_args(["run", "--processes", "2", "--drafters", "ar, ngram", "--temperature", "-1",
                              "--resume", "--device-map", "auto", "--max-new-tokens", "12"])
    argv = distributed.forwarded_argv(args.run_parser, args)
    assert not any(a.startswith("--processes") for a in argv)
    again = parser.parse_args(["run", *argv])
    same = {k: v for k, v in vars(args).items() if k not in ("processes", "run_parser")}
    assert {k: v for k, v in vars(again).items() if k in same} == same
    assert again.processes is None


def test_fault_hook_format_is_checked(monkeypatch):
    monkeypatch.setenv(distributed.FAIL_ENV, "1")
    with pytest.raises(UserError, match="RANK:N"):
        distributed._fault_hook(1)
    monkeypatch.setenv(distributed.FAIL_ENV, "1:2")
    assert distributed._fault_hook(0) is None
    hook = distributed._fault_hook(1)
    hook()
    with pytest.raises(RuntimeError, match="injected failure of rank 1 after 2"):
        hook()


def test_device_map_auto_records_the_placement(tiny_dir, questions, tmp_path):
    assert main(["run", "--target", str(tiny_dir), "--prompts", str(questions), "--limit", "1", "--drafters", "ar",
                 "--max-new-tokens", "4", "--meter", "off", "--warmup", "0", "--device-map", "auto",
                 "--out", str(tmp_path), "--run-id", "placed"]) == 0
    env = json.loads((tmp_path / "placed" / "env.json").read_text())
    assert env["backend"] == "hf"
    assert env["device_map"] == {"": "cpu"}  # no GPU here: accelerate puts every module on the CPU


def test_device_map_needs_the_hf_backend(tiny_dir):
    with pytest.raises(UserError, match="hf backend"):
        load_target(str(tiny_dir), backend="native", device_map="auto")


def test_processes_checks(monkeypatch, capsys, tmp_path):
    for name in distributed.WORLD_ENVS:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.should_launch(None) and not distributed.should_launch(1)
    assert distributed.should_launch(2)
    assert main(["run", "--processes", "2", "--device-map", "auto", "--out", str(tmp_path)]) == 2
    assert "--device-map auto" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "prompts.jsonl").write_text("")
    assert main(["run", "--processes", "2", "--out", str(tmp_path), "--run-id", "taken", "--device", "cpu"]) == 2
    assert "--resume" in capsys.readouterr().err  # refused before anything is launched
    with pytest.raises(UserError, match="--processes"):
        distributed.should_launch(0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside a launch: run, do not launch again
    assert distributed.launched() and not distributed.should_launch(2)
    with pytest.raises(UserError, match="inside a launch"):
        distributed.should_launch(4)
