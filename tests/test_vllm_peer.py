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
import torch

from harness.drafters.heads import read_config, shipped_head
from harness.drafters.vllm_peer import (check_head, counters_from_steps, exported_head, head_for, speculative_config,
                                        step_records, tau_from_counters, vllm_python)
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


def test_exported_head_is_the_shipped_head_in_vllms_layout(tmp_path, monkeypatch):
    """vllm-eagle3's default head: the shipped eagle3 head written once by export_head into the cache, the
    same weights (fp32), vLLM's layer ids (ours + 1); --vllm-head DIR replaces it."""
    from safetensors.torch import load_file

    monkeypatch.setattr("harness.targets.loading.cache_root", lambda: tmp_path)
    out = exported_head("smollm2-135m")
    assert out.parent == tmp_path / "vllm-heads"
    src = shipped_head("smollm2-135m", "eagle3")
    theirs, ours = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    assert set(theirs) == set(ours)
    for name, t in ours.items():
        assert theirs[name].dtype == (torch.float32 if t.is_floating_point() else t.dtype), name
        assert torch.equal(theirs[name], t.to(theirs[name].dtype)), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [j + 1 for j in read_config(src).layers]
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert exported_head("smollm2-135m") == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert head_for("smollm2-135m", {}) == out.resolve()
    assert head_for("smollm2-135m", {"vllm_head": str(out)}) == out.resolve()
    with pytest.raises(UserError, match="export-head"):
        head_for("smollm2-135m", {"vllm_head": str(tmp_path / "none")})
    with pytest.raises(UserError, match="no eagle3 head ships"):
        exported_head("gemma3-270m")


class FakeWorker:
    """Stands in for the vLLM worker: answers each turn with the next output in OUTPUTS, one token per
    forward, no drafts (what plain vLLM reports)."""
    OUTPUTS: list = []

    def __init__(self, start, log_dir=None):
        self.info = {"ok": True, "vllm": "fake"}

    def call(self, msg):
        results = []
        for _ in msg["requests"]:
            ids = FakeWorker.OUTPUTS.pop(0)
            results.append(dict(output_ids=ids, emitted=[1] * len(ids), step_s=[0.01] * len(ids), wall_s=0.01,
                                step_accepted=[], step_drafted=[], finish_reason="length"))
        counters = dict(num_drafts=0, num_draft_tokens=0, num_accepted_tokens=0, num_accepted_tokens_per_pos=[])
        return {"ok": True, "wall_s": 0.01, "counters": counters, "results": results}

    def close(self):
        pass


@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_vllm_row_that_differs_from_ar_gets_the_margin_gate(tmp_path, monkeypatch, batch_size):
    """divergence.jsonl and diverged_wide cover vLLM peers' rows (at batch 1 and batched): a vLLM output
    that leaves ar's gets its first difference and the target's margin there, and the summary's
    `diverged_wide` for the row is defined."""
    from conftest import byte_tokenizer, tiny_model
    from harness import runner
    from harness.config import RunConfig
    from harness.drafters import vllm_peer
    from harness.engine.divergence import WIDE_MARGIN
    from harness.records import read_jsonl
    from harness.reports.summary import summarize

    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6.0)  # tied with the LM head: wide top-1 margins
    model.generation_config.eos_token_id = 257
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    with open(tmp_path / "q.jsonl", "w") as fh:
        for i in range(2):
            fh.write(json.dumps({"question_id": f"q{i}", "category": "c", "turns": [f"abc abc {i} abc"]}) + "\n")
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("")
    monkeypatch.setenv("SPEC_HARNESS_VLLM_VENV", str(venv.parent))
    monkeypatch.setattr(vllm_peer, "WorkerProcess", FakeWorker)

    def go(run_id, drafters):
        cfg = RunConfig(target=str(tmp_path / "m"), backend="native", drafters=drafters, suite=str(tmp_path / "q.jsonl"),
                        max_new_tokens=8, k=3, device="cpu", max_len=256, out=str(tmp_path), run_id=run_id,
                        meter=False, warmup=0, batch_size=batch_size)
        return runner.run(cfg)

    ar = {r["prompt_id"]: r["output_ids"] for r in read_jsonl(go("ar", ("ar",)) / "prompts.jsonl")}
    flipped = list(ar["q0"][0])
    flipped[2] = (flipped[2] + 1) % 256
    FakeWorker.OUTPUTS = [flipped, list(ar["q1"][0])]  # q0 leaves ar's output at position 2; q1 is ar's
    out = go("v", ("ar", "vllm"))
    recs = {r["prompt_id"]: r for r in read_jsonl(out / "prompts.jsonl") if r["drafter"] == "vllm"}
    assert recs["q0"]["diverged"] is True and recs["q1"]["diverged"] is False
    lines = list(read_jsonl(out / "divergence.jsonl"))
    assert len(lines) == 1
    d = lines[0]
    assert (d["drafter"], d["prompt_id"], d["turn"], d["position"]) == ("vllm", "q0", 0, 2)
    assert (d["ar_token"], d["drafter_token"]) == (ar["q0"][0][2], flipped[2])
    assert d["target_top1"] == ar["q0"][0][2] and d["wide"] == (d["margin"] > WIDE_MARGIN)
    row = summarize(out).set_index(["drafter", "category"]).loc[("vllm", "all")]
    assert row["diverged"] == 0.5
    assert row["diverged_wide"] == 0.5 * d["wide"]  # defined, not NaN: the vLLM row is gated


# ----------------------------------------------------------------------------- vLLM itself

VLLM_PEERS = ("vllm", "vllm-ngram", "vllm-draft", "vllm-eagle3")
DRAFT_SKIP = tuple(range(14, 30))  # the draft model: SmolLM2's first 14 layers (harness.targets.subset)


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """One run on two mini prompts of 16 new tokens, greedy, fp32, SmolLM2: ar, our eagle3 (the shipped
    head) and model (SmolLM2's first 14 layers, written by subset-model), and the four vLLM peers:
    vllm-eagle3 with its default head (the shipped one, exported by export_head into the cache) and
    vllm-draft with the same draft folder. vLLM runs eager here (no torch.compile) to start quickly."""
    import time

    from harness.config import RunConfig
    from harness.reports.summary import write_summary
    from harness.runner import run
    from harness.targets.loading import resolve_source
    from harness.targets.subset import write_subset

    t0 = time.perf_counter()
    tmp = tmp_path_factory.mktemp("vllm")
    draft = write_subset(resolve_source("smollm2-135m")[1], DRAFT_SKIP, tmp / "draft")
    cfg = RunConfig(drafters=("ar", "eagle3", "model") + VLLM_PEERS, suite="mini", limit=2,
                    max_new_tokens=16, k=K, out=str(tmp), run_id="r", meter=False, warmup=0,
                    draft_model=str(draft), extra={"vllm_eager": True})
    out = run(cfg)
    summary = write_summary(out)
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    env = json.loads((out / "env.json").read_text())
    print(f"vllm_run fixture: {time.perf_counter() - t0:.0f} s")
    return prompts, steps, summary, env


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_greedy_outputs_equal_ar(vllm_run):
    prompts, _, _, env = vllm_run
    ar = {p["prompt_id"]: p["output_ids"] for p in prompts if p["drafter"] == "ar"}
    assert len(ar) == 2
    for name in VLLM_PEERS:
        mine = {p["prompt_id"]: p for p in prompts if p["drafter"] == name}
        assert set(mine) == set(ar)
        for pid, rec in mine.items():
            assert rec["output_ids"] == ar[pid], (name, pid)
            assert rec["diverged"] is False
            assert 0 < rec["new_tokens"] <= 16
    assert set(env["peers"]) == set(VLLM_PEERS)
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
    for name in VLLM_PEERS:
        row = summary[(summary["drafter"] == name) & (summary["category"] == "all")].iloc[0]
        recs = [p for p in prompts if p["drafter"] == name]
        c_acc = sum(p["vllm_counters"]["num_accepted_tokens"] for p in recs)
        fwd = sum(p["forwards"] for p in recs)
        cut = sum(p["cut_tokens"] for p in recs)
        assert row["tau"] == pytest.approx((fwd + c_acc - cut) / fwd)


def _accepted(prompts, name):
    return sum(p["accepted"] for p in prompts if p["drafter"] == name)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_eagle3_drafts_with_the_shipped_head_as_we_do(vllm_run):
    """vLLM loads the exported shipped head (the default) and accepts about what our eagle3 accepts with
    it on the same outputs: a wrong layer id, vocabulary map or norm in the export would lower it."""
    prompts, _, summary, env = vllm_run
    head = Path(env["peers"]["vllm-eagle3"]["speculative_config"]["model"])
    assert head == exported_head("smollm2-135m")  # the default: the shipped head, exported
    assert json.loads((head / "config.json").read_text())["spec_harness"]["fingerprint"] == \
        read_config(shipped_head("smollm2-135m", "eagle3")).fingerprint
    recs = [p for p in prompts if p["drafter"] == "vllm-eagle3"]
    assert sum(p["vllm_counters"]["num_draft_tokens"] for p in recs) >= K  # it drafted with the head
    ours, theirs = _accepted(prompts, "eagle3"), _accepted(prompts, "vllm-eagle3")
    assert ours > 0 and theirs > 0  # a trained head gets drafts accepted
    assert abs(theirs - ours) <= max(2, 0.2 * ours), (ours, theirs)  # same head, same outputs: numerics only
    plain = [p for p in prompts if p["drafter"] == "vllm"]
    assert all(p["vllm_counters"]["num_drafts"] == 0 for p in plain)
    row = summary[(summary["drafter"] == "vllm-eagle3") & (summary["category"] == "all")].iloc[0]
    assert row["acc_uncond_1"] > 0


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_draft_runs_the_subset_model_as_our_model_drafter(vllm_run):
    prompts, _, _, env = vllm_run
    assert env["peers"]["vllm-draft"]["speculative_config"]["method"] == "draft_model"
    recs = [p for p in prompts if p["drafter"] == "vllm-draft"]
    assert sum(p["vllm_counters"]["num_draft_tokens"] for p in recs) >= K
    ours = [p for p in prompts if p["drafter"] == "model"]
    assert sum(p["drafted"] for p in recs) > 0 and sum(p["drafted"] for p in ours) > 0
    # the same greedy draft model on the same outputs: acceptance within a draft or two of ours
    assert abs(_accepted(prompts, "vllm-draft") - _accepted(prompts, "model")) <= 2


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
