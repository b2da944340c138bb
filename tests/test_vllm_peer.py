"""vLLM peers (harness.drafters.vllm_peer). The first tests need no vLLM: how vLLM's per-request step
counts become our step records, and the one-line errors. The tests marked `vllm` run vLLM itself from
its own venv (`make vllm-venv`; `make test` creates it): they fail, never skip, when it is missing.
Leave them out locally with -m "not vllm"."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.drafters.vllm_peer import (check_head, counters_from_steps, speculative_config, step_records,
                                        tau_from_counters, vllm_python)
from harness.errors import UserError

K = 5


# ----------------------------------------------------------------------------- records, no vLLM

def test_step_records_match_forwards_to_verify_steps():
    # prefill (1 token), a verify step accepting 2, a forward without drafts, a verify step accepting 0,
    # a verify step accepting 4 whose output was cut at a stop id after 3 tokens.
    emitted = [1, 3, 1, 1, 3]
    steps = step_records(emitted, step_accepted=[2, 0, 4], step_drafted=[5, 3, 5], step_s=[9.0, 1, 2, 3, 4])
    # the two one-token forwards look alike from the outputs: the verify step takes the first of them
    assert [(s["drafted"], s["accepted"], s["emitted"]) for s in steps] == [(5, 2, 3), (3, 0, 1), (0, 0, 1), (5, 4, 3)]
    assert [s["t_other"] for s in steps] == [1, 2, 3, 4]  # the prefill's time is not a step's
    assert all(s["depth"] == s["drafted"] for s in steps)


def test_step_records_need_every_verify_step_matched():
    with pytest.raises(RuntimeError, match="verify steps do not fit"):
        step_records([1, 1, 1], step_accepted=[3, 3], step_drafted=[5, 5])  # one-token forwards cannot accept 3


def test_a_forward_of_several_tokens_needs_a_verify_step():
    with pytest.raises(RuntimeError, match="without a verify step"):
        step_records([1, 1, 3], step_accepted=[], step_drafted=[])


def test_a_one_token_forward_with_drafts_left_to_place_is_a_verify_step():
    # the forwards left are exactly the verify steps left: each must be one even when it emitted one token
    steps = step_records([1, 2, 1], step_accepted=[1, 0], step_drafted=[5, 5])
    assert [(s["drafted"], s["accepted"]) for s in steps] == [(5, 1), (5, 0)]


def test_counters_from_steps_and_tau_from_counters():
    steps = step_records([1, 3, 1, 1, 6, 2], step_accepted=[2, 0, 5, 3], step_drafted=[5, 5, 5, 5])
    c = counters_from_steps(steps, K)
    assert c == dict(num_drafts=4, num_draft_tokens=20, num_accepted_tokens=10,
                     num_accepted_tokens_per_pos=[3, 3, 2, 1, 1])
    cut = sum(s["accepted"] + 1 - s["emitted"] for s in steps[-1:])  # the last step kept 2 of its 4
    assert cut == 2
    new_tokens_after_prefill = sum([3, 1, 1, 6, 2])
    assert tau_from_counters(c, len(steps), cut) == pytest.approx(new_tokens_after_prefill / len(steps))


def test_speculative_configs():
    assert speculative_config("vllm", K) is None
    assert speculative_config("vllm-ngram", K)["num_speculative_tokens"] == K
    assert speculative_config("vllm-eagle3", 3, head="/h") == {"method": "eagle3", "model": "/h",
                                                              "num_speculative_tokens": 3}
    assert speculative_config("vllm-draft", 4, draft_folder="/d")["method"] == "draft_model"


def test_missing_venv_and_bad_head_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEC_HARNESS_VLLM_VENV", str(tmp_path / "none"))
    with pytest.raises(UserError, match="setup_vllm.sh"):
        vllm_python()
    with pytest.raises(UserError, match="export-head"):
        check_head(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="not a vLLM EAGLE-3 head"):
        check_head(tmp_path)


def test_cli_without_the_vllm_venv_is_one_line(tmp_path):
    env = dict(os.environ, SPEC_HARNESS_VLLM_VENV=str(tmp_path / "none"))
    res = subprocess.run([sys.executable, "-m", "harness", "run", "--drafters", "ar,vllm"], capture_output=True,
                         text=True, cwd="/tmp", env=env)
    assert res.returncode == 2
    assert "setup_vllm.sh" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_tensor_parallel_size_is_one_line():
    res = subprocess.run([sys.executable, "-m", "harness", "run", "--drafters", "ar,vllm",
                          "--vllm-tensor-parallel-size", "0"], capture_output=True, text=True, cwd="/tmp")
    assert res.returncode == 2 and "--vllm-tensor-parallel-size must be >= 1" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- vLLM itself

@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """One run: ar, vllm, vllm-ngram and vllm-eagle3 (a random head in vLLM's layout) on two mini prompts
    of 16 new tokens, greedy, fp32, SmolLM2. vLLM runs eager here (no torch.compile) to start quickly."""
    from harness.config import RunConfig
    from harness.reports.summary import write_summary
    from harness.runner import run
    from harness.targets.loading import resolve_source
    from vllm_head import write_random_eagle3_head

    tmp = tmp_path_factory.mktemp("vllm")
    folder = Path(resolve_source("smollm2-135m")[1])
    head = write_random_eagle3_head(tmp / "head", json.loads((folder / "config.json").read_text()))
    cfg = RunConfig(drafters=("ar", "vllm", "vllm-ngram", "vllm-eagle3"), suite="mini", limit=2,
                    max_new_tokens=16, k=K, out=str(tmp), run_id="r", meter=False, warmup=0,
                    extra={"vllm_eager": True, "vllm_head": str(head)})
    out = run(cfg)
    summary = write_summary(out)
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    env = json.loads((out / "env.json").read_text())
    return prompts, steps, summary, env


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_greedy_outputs_equal_ar(vllm_run):
    prompts, _, _, env = vllm_run
    ar = {p["prompt_id"]: p["output_ids"] for p in prompts if p["drafter"] == "ar"}
    assert len(ar) == 2
    for name in ("vllm", "vllm-ngram", "vllm-eagle3"):
        mine = {p["prompt_id"]: p for p in prompts if p["drafter"] == name}
        assert set(mine) == set(ar)
        for pid, rec in mine.items():
            assert rec["output_ids"] == ar[pid], (name, pid)
            assert rec["diverged"] is False
            assert 0 < rec["new_tokens"] <= 16
    assert set(env["peers"]) == {"vllm", "vllm-ngram", "vllm-eagle3"}
    assert env["peers"]["vllm-ngram"]["speculative_config"]["method"] == "ngram"
    assert env["peers"]["vllm"]["vllm"].startswith("0.")  # vLLM's venv's versions, beside ours


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_counters_equal_its_step_records_and_tau(vllm_run):
    prompts, steps, summary, _ = vllm_run
    for rec in (p for p in prompts if p["drafter"].startswith("vllm")):
        mine = [s for s in steps if s["drafter"] == rec["drafter"] and s["prompt_id"] == rec["prompt_id"]]
        assert len(mine) == rec["forwards"] == rec["steps"]
        c = rec["vllm_counters"]  # from llm.get_metrics(), the cumulative counters' difference
        derived = counters_from_steps(mine, K)  # from the per-request step arrays and the step loop
        for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            assert c[key] == derived[key], (rec["drafter"], key)
        if c["num_drafts"]:
            assert c["num_accepted_tokens_per_pos"] == derived["num_accepted_tokens_per_pos"]
        turns = len(rec["output_ids"])  # each turn's first token came from the prefill
        tau_outputs = (rec["new_tokens"] - turns) / rec["forwards"]
        assert tau_from_counters(c, rec["forwards"], rec["cut_tokens"]) == pytest.approx(tau_outputs)
    for name in ("vllm", "vllm-ngram", "vllm-eagle3"):
        row = summary[(summary["drafter"] == name) & (summary["category"] == "all")].iloc[0]
        recs = [p for p in prompts if p["drafter"] == name]
        c_acc = sum(p["vllm_counters"]["num_accepted_tokens"] for p in recs)
        fwd = sum(p["forwards"] for p in recs)
        cut = sum(p["cut_tokens"] for p in recs)
        assert row["tau"] == pytest.approx((fwd + c_acc - cut) / fwd)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_eagle3_head_loads_and_drafts(vllm_run):
    prompts, _, summary, _ = vllm_run
    recs = [p for p in prompts if p["drafter"] == "vllm-eagle3"]
    assert sum(p["vllm_counters"]["num_draft_tokens"] for p in recs) >= K  # it drafted with the head
    plain = [p for p in prompts if p["drafter"] == "vllm"]
    assert all(p["vllm_counters"]["num_drafts"] == 0 for p in plain)
    row = summary[(summary["drafter"] == "vllm-eagle3") & (summary["category"] == "all")].iloc[0]
    assert row["acc_uncond_1"] == row["acc_uncond_1"]  # acceptance by position is defined (not NaN)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_batch_hands_vllm_the_batch(tmp_path):
    """--batch-size 2: vLLM decodes both prompts together; records as at batch 1, and batch_runs.jsonl
    holds the run's throughput and counters, which equal the sum of the step records."""
    from harness.config import RunConfig
    from harness.reports.summary import write_summary
    from harness.runner import run

    cfg = RunConfig(drafters=("ar", "vllm-ngram"), suite="mini", limit=2, max_new_tokens=16, k=K, out=str(tmp_path),
                    run_id="b", meter=False, warmup=0, batch_size=2, extra={"vllm_eager": True})
    out = run(cfg)
    summary = write_summary(out)
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    runs = [json.loads(line) for line in (out / "batch_runs.jsonl").read_text().splitlines()]
    ar = {p["prompt_id"]: p["output_ids"] for p in prompts if p["drafter"] == "ar"}
    mine = [p for p in prompts if p["drafter"] == "vllm-ngram"]
    assert len(mine) == 2 and all(p["batch_size"] == 2 for p in mine)
    assert all(p["output_ids"] == ar[p["prompt_id"]] and p["diverged"] is False for p in mine)
    run_rec = next(r for r in runs if r["drafter"] == "vllm-ngram")
    assert run_rec["batch_size"] == 2 and run_rec["new_tokens"] == sum(p["new_tokens"] for p in mine)
    derived = counters_from_steps([s for s in steps if s["drafter"] == "vllm-ngram"], K)
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert run_rec["vllm_counters"][key] == derived[key]
    row = summary[(summary["drafter"] == "vllm-ngram") & (summary["category"] == "all")].iloc[0]
    assert row["batch_size"] == 2 and row["prompts"] == 2
