"""A run that survives its failures, counts what it emitted, and gates losslessness by the margin.

- a drafter's exception or NaN logits fail that prompt only: recorded with a reason, the rest goes on,
  summary.md lists it, the exit status is 1, --resume retries it;
- step records count emitted tokens (a step cut at EOS / the token limit), so tau and accepted/step agree;
- the meter observes outside the timed step;
- a broken verifier makes `diverged_wide` non-zero; a correct one keeps it 0.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from harness import runner
from harness.seeds import row_key
from harness.cli import main
from harness.config import RunConfig
from harness.drafters.ar import AR
from harness.drafters.model import ARDraftModel
from harness.drafters.ngram import NGram
from harness.engine import step as step_module
from harness.engine.scheduler import Scheduler
from harness.records import read_jsonl
from harness.reports.summary import failed_prompts, summarize
from harness.suites import Prompt
from harness.targets import build_target

EOS = {257}


def suite(path, n=4):
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"question_id": f"q{i}", "category": "c",
                                 "turns": [f"repeat after me: abc abc abc {i} abc abc"]}) + "\n")
    return str(path)


class Exploding(NGram):
    """ngram that raises while prompt q2 is in the batch (recognised by its row's random-stream key)."""

    armed = True

    def propose(self, ctx):
        if self.armed and row_key(0, "q2", 0, "ngram", "draft") in ctx.draft_keys.tolist():
            raise RuntimeError("boom in propose")
        return super().propose(ctx)


def test_a_failed_prompt_is_recorded_and_the_run_goes_on(tiny_dir, tmp_path, monkeypatch, capsys):
    real = runner.build_drafter
    monkeypatch.setattr(runner, "build_drafter", lambda name, t, cfg: Exploding() if name == "ngram" else real(name, t, cfg))
    argv = ["run", "--target", str(tiny_dir), "--backend", "native", "--drafters", "ar,ngram", "--suite",
            suite(tmp_path / "q.jsonl"), "--max-new-tokens", "8", "--k", "3", "--device", "cpu", "--out",
            str(tmp_path), "--run-id", "r", "--meter", "off", "--warmup", "0"]
    assert main(argv) == 1  # non-zero at the end
    err = capsys.readouterr().err
    assert "1 prompt(s) failed" in err and "Traceback" not in err
    out = tmp_path / "r"
    recs = list(read_jsonl(out / "prompts.jsonl"))
    failed = [r for r in recs if r.get("failed")]
    assert [(r["drafter"], r["prompt_id"]) for r in failed] == [("ngram", "q2")]
    assert failed[0]["failed"] == "RuntimeError: boom in propose"
    assert {(r["drafter"], r["prompt_id"]) for r in recs if not r.get("failed")} == \
        {(d, f"q{i}") for d in ("ar", "ngram") for i in range(4)} - {("ngram", "q2")}
    assert "## Failed prompts" in (out / "summary.md").read_text() and "boom in propose" in (out / "summary.md").read_text()
    assert not [s for s in read_jsonl(out / "steps.jsonl") if s["drafter"] == "ngram" and s["prompt_id"] == "q2"]
    # --resume retries the failed prompt (and only it)
    Exploding.armed = False
    try:
        assert main(argv + ["--resume"]) == 0
    finally:
        Exploding.armed = True
    recs = list(read_jsonl(out / "prompts.jsonl"))
    assert not any(r.get("failed") for r in recs) and len(recs) == 8 and not failed_prompts(out)


def test_nan_logits_fail_that_row_only():
    target = build_target(tiny_model(), byte_tokenizer(), "tiny", "native", max_len=256)
    prompts = [Prompt(f"p{i}", "c", "s", (t,)) for i, t in enumerate(["aaaa", "poison here", "cccc", "dd"])]
    ref = {}
    Scheduler(target, AR(), name="ar", batch_size=1, max_new_tokens=10, k=3, temperature=0.0, seed=0, eos_ids=EOS,
              on_finish=lambda p, f, s: ref.setdefault(p.prompt_id, f["output_ids"])).run(prompts)
    real_forward = target.forward
    calls = {"n": 0}

    def poisoned(ids, *a, **kw):  # the row holding prompt p1 gets NaN logits at its third step
        out = real_forward(ids, *a, **kw)
        calls["n"] += 1
        for b, seq in enumerate(sched.rows):
            if seq is not None and seq.prompt.prompt_id == "p1" and len(seq.steps) == 2:
                out.logits[b] = float("nan")
        return out

    got, failed = {}, {}
    sched = Scheduler(target, NGram(), name="ngram", batch_size=3, max_new_tokens=10, k=3, temperature=0.0, seed=0,
                      eos_ids=EOS, on_finish=lambda p, f, s: got.setdefault(p.prompt_id, f["output_ids"]),
                      on_fail=lambda p, reason, f: failed.setdefault(p.prompt_id, reason))
    target.forward = poisoned
    try:
        sched.run(prompts)
    finally:
        target.forward = real_forward
    assert failed == {"p1": "NaN or inf in the target's logits (turn 1, step 3)"}
    assert got == {k: v for k, v in ref.items() if k != "p1"}


def twin_drafter():
    return ARDraftModel(build_target(tiny_model(), byte_tokenizer(), "twin", "native", max_len=256), "model")


def test_counts_are_of_emitted_tokens():
    """The target's twin as draft model accepts every draft: with K = 4 and 4 new tokens, the one step
    emits 3 of its 5 tokens (room 3): it records emitted 3, accepted 3, drafted 3, cut."""
    target = build_target(tiny_model(), byte_tokenizer(), "tiny", "native", max_len=256)
    got = {}
    Scheduler(target, twin_drafter(), name="model", batch_size=1, max_new_tokens=4, k=4, temperature=0.0, seed=0,
              eos_ids=set(), on_finish=lambda p, f, s: got.update(f=f, s=s)).run([Prompt("p", "c", "s", ("hello",))])
    assert [(s["drafted"], s["depth"], s["accepted"], s["emitted"], s["cut"]) for s in got["s"]] == [(3, 3, 3, 3, True)]
    assert len(got["f"]["output_ids"][0]) == 4


def test_tau_and_accepted_per_step_on_one_basis(tiny_dir, tmp_path):
    cfg = RunConfig(target=str(tiny_dir), backend="native", drafters=("ar", "ngram"), suite=suite(tmp_path / "q.jsonl"),
                    max_new_tokens=9, k=4, device="cpu", max_len=256, out=str(tmp_path), run_id="r", meter=False,
                    warmup=0)
    out = runner.run(cfg)
    steps = [s for s in read_jsonl(out / "steps.jsonl") if s["drafter"] == "ngram"]
    df = summarize(out).set_index(["drafter", "category"])
    row = df.loc[("ngram", "all")]
    uncut = sum(not s["cut"] for s in steps) / len(steps)
    assert row["tau"] == pytest.approx(row["mean_accepted"] + uncut)
    assert all(s["emitted"] == s["accepted"] + (not s["cut"]) for s in steps)
    assert row["accept_rate"] == pytest.approx(sum(s["accepted"] for s in steps) / sum(s["drafted"] for s in steps))


def test_meter_observes_outside_the_step(monkeypatch):
    from harness.meter.core import Meter

    target = build_target(tiny_model(), byte_tokenizer(), "tiny", "native", max_len=256)
    inside = {"now": False, "observed": 0}
    real_step, real_observe = step_module.Engine.step, Meter.observe

    def step(self, *a, **kw):
        inside["now"] = True
        try:
            return real_step(self, *a, **kw)
        finally:
            inside["now"] = False

    def observe(self, *a, **kw):
        assert not inside["now"], "the meter observed inside the timed step"
        inside["observed"] += 1
        return real_observe(self, *a, **kw)

    monkeypatch.setattr(step_module.Engine, "step", step)
    monkeypatch.setattr(Meter, "observe", observe)
    got = {}
    Scheduler(target, NGram(), name="ngram", batch_size=2, max_new_tokens=8, k=3, temperature=0.0, seed=0,
              eos_ids=EOS, new_meter=lambda: Meter("cpu", 64, 3),
              on_finish=lambda p, f, s: got.setdefault(p.prompt_id, s)).run(
        [Prompt(f"p{i}", "c", "s", ("abc abc abc",)) for i in range(3)])
    assert inside["observed"] == sum(len(s) for s in got.values()) > 0


def sharp_target(tmp_path):
    """A tiny target with a scaled LM head: wide top-1 margins."""
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6.0)  # tied with the LM head: sharper logits
    model.generation_config.eos_token_id = 257
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def accept_all_verifier():
    real = step_module.verify_chain

    def accept_all(logits, prop, *a, **kw):
        res = real(logits, prop, *a, **kw)
        K = prop.tokens.shape[1]
        counts = prop.num_draft.to(logits.device) if prop.num_draft is not None else torch.full_like(res.num_accepted, K)
        width = res.emitted.shape[1]
        idx = torch.arange(width)[None, :]
        drafts = torch.cat([prop.tokens, prop.tokens.new_zeros(prop.tokens.shape[0], 1)], 1)[:, :width]
        bonus = res.emitted[:, :1].clamp(min=0)  # any valid token after the drafts
        res.emitted = torch.where(idx < counts[:, None], drafts, torch.where(idx == counts[:, None], bonus, -1))
        res.num_accepted = counts.clone()
        return res

    return accept_all


def test_broken_verifier_makes_diverged_wide_nonzero(tmp_path, monkeypatch):
    """A verifier that accepts every draft diverges where the target's margins are wide, and the margin
    gate calls it a bug. With the real verifier both stay 0."""
    target = sharp_target(tmp_path)

    def go(run_id):
        cfg = RunConfig(target=target, backend="native", drafters=("ar", "ngram"),
                        suite=suite(tmp_path / "q.jsonl"), max_new_tokens=12, k=4, device="cpu", max_len=256,
                        out=str(tmp_path), run_id=run_id, meter=False, warmup=0)
        return summarize(runner.run(cfg)).set_index(["drafter", "category"]).loc[("ngram", "all")]

    good = go("good")
    assert good["diverged"] == 0 and good["diverged_wide"] == 0
    monkeypatch.setattr(step_module, "verify_chain", accept_all_verifier())
    bad = go("bad")
    assert bad["diverged"] > 0 and bad["diverged_wide"] > 0
    recs = list(read_jsonl(tmp_path / "bad" / "divergence.jsonl"))
    assert recs and all(r["margin"] >= 0 and r["ar_token"] != r["drafter_token"] for r in recs)


def test_an_interrupted_run_keeps_the_divergence_of_what_finished(tmp_path, monkeypatch):
    """Interrupted after two prompts (ar and ngram each), the run still writes those prompts' divergence
    lines, so the margin gate reads on what finished (the H200's MT-bench run, stopped at its cap, had none)."""
    target = sharp_target(tmp_path)
    monkeypatch.setattr(step_module, "verify_chain", accept_all_verifier())
    real, calls = runner.run_prompt, []

    def stop_on_the_fifth(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "run_prompt", stop_on_the_fifth)
    cfg = RunConfig(target=target, backend="native", drafters=("ar", "ngram"), suite=suite(tmp_path / "q.jsonl"),
                    max_new_tokens=12, k=4, device="cpu", max_len=256, out=str(tmp_path), run_id="cut",
                    meter=False, warmup=0)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg)
    finished = [r for r in read_jsonl(tmp_path / "cut" / "prompts.jsonl") if r["drafter"] == "ngram"]
    assert len(finished) == 2 and all(r["diverged"] for r in finished)
    lines = list(read_jsonl(tmp_path / "cut" / "divergence.jsonl"))
    assert {r["prompt_id"] for r in lines} == {r["prompt_id"] for r in finished}
