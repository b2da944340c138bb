"""Batched decoding with continuous batching (harness.engine.scheduler) on a tiny fp32 model: outputs at temperature
0 equal batch-1 outputs, prompts join and leave, records carry the batch-1 fields."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from harness.engine.scheduler import BATCH_FIELDS, BatchDecoder, batch_summary, format_batch_summary, keep_cache_rows, one_row
from harness.config import RunConfig
from harness.drafters import build_drafter
from harness.errors import UserError
from harness.records import PROMPT_FIELDS, STEP_FIELDS, read_jsonl
from harness.runner import run, run_prompt
from harness.suites import Prompt
from harness.targets import build_target

EOS = {257}
TEXTS = ("hi", "tell me a long story about cats and dogs", "abcabcabc abcabc abc", "x" * 30, "what is 2+2?")


@pytest.fixture(scope="module")
def target():
    return build_target(tiny_model(), byte_tokenizer(), "tiny", "native", max_len=256)


def prompts():
    out = [Prompt(f"p{i}", "c", "s", (t,)) for i, t in enumerate(TEXTS)]
    out[1] = Prompt("p1", "c", "s", (TEXTS[1], "and again, shorter"))  # two turns, sequential in one row
    return out


@pytest.mark.parametrize("name", ["ar", "ngram", "layerskip"])
def test_batched_outputs_equal_batch1(target, name):
    cfg = RunConfig(k=3, max_new_tokens=12, temperature=0.0, meter=False, layerskip_layers=2)
    drafter = build_drafter(name, target, cfg)
    ref = {p.prompt_id: run_prompt(cfg, target, drafter, p, EOS)[0]["output_ids"] for p in prompts()}
    got = {}
    dec = BatchDecoder(target, drafter, batch_size=3, max_new_tokens=12, k=3, temperature=0.0, seed=0, eos_ids=EOS,
                       on_finish=lambda p, fields, steps: got.setdefault(p.prompt_id, (fields, steps)))
    wall = dec.run(prompts())
    assert {pid: f["output_ids"] for pid, (f, _) in got.items()} == ref
    joined = sorted(f["joined_s"] for f, _ in got.values())
    assert joined[3] > 0 and joined[3] >= min(f["left_s"] for f, _ in got.values())  # p3, p4 joined later
    for fields, steps in got.values():
        assert 0 < fields["wall_s"] <= wall
        assert sum(s["emitted"] for s in steps) == fields["new_tokens"] - len(fields["output_ids"])  # + prefill tokens
        assert [s["step"] for s in steps if s["turn"] == 0] == list(range(sum(s["turn"] == 0 for s in steps)))
    assert [len(f["output_ids"]) for f, _ in [got["p1"]]] == [2]


def test_cache_rows_view_and_compaction(target):
    target.reset(3)
    rows = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    for b, ids in enumerate(rows):
        with one_row(target, b, empty=True) as row:
            row.prefill(torch.tensor([ids]))
    assert target.lengths.tolist() == [4, 2, 3]
    k0 = target.k_cache[:, 2, :, :3].clone()
    keep_cache_rows(target, [2, 1])  # row 0 leaves, row 2 moves into its place
    assert target.lengths.tolist() == [3, 2] and target.k_cache.shape[1] == 2
    torch.testing.assert_close(target.k_cache[:, 0, :, :3], k0, atol=0, rtol=0)
    ref = target.forward(torch.tensor([[10], [11]])).logits[:, -1]
    target.reset(1)
    target.prefill(torch.tensor([[7, 8, 9]]))
    torch.testing.assert_close(target.forward(torch.tensor([[10]])).logits[0, -1], ref[0], atol=1e-5, rtol=0)


def write_suite(path):
    with open(path, "w") as fh:
        for p in prompts():
            fh.write(json.dumps({"question_id": p.prompt_id, "category": "c", "turns": list(p.turns)}) + "\n")
    return str(path)


def test_run_writes_batch1_fields(tiny_dir, tmp_path):
    cfg = RunConfig(target=str(tiny_dir), backend="native", drafters=("ar", "ngram"), suite=write_suite(tmp_path / "q.jsonl"),
                    max_new_tokens=8, k=3, device="cpu", max_len=256, out=str(tmp_path), run_id="r", meter=False,
                    warmup=1, batch_size=3)
    out = run(cfg)
    steps, recs = list(read_jsonl(out / "steps.jsonl")), list(read_jsonl(out / "prompts.jsonl"))
    assert steps and set(STEP_FIELDS) == set(steps[0])
    assert {s["batch_size"] for s in steps} == {3}
    assert len(recs) == 10 and all(set(PROMPT_FIELDS) | {"batch_size", "joined_s", "left_s"} == set(r) for r in recs)
    assert all(r["diverged"] is False for r in recs if r["drafter"] == "ngram")
    runs = list(read_jsonl(out / "batch_runs.jsonl"))
    assert [r["drafter"] for r in runs] == ["ar", "ngram"] and set(BATCH_FIELDS) - {"predicted_tau", "predicted_tok_s",
                                                                                      "predicted_speedup"} <= set(runs[0])
    df = batch_summary(out)
    assert list(df["drafter"]) == ["ar", "ngram"] and df.loc[0, "speedup_total"] == pytest.approx(1.0)
    assert df.loc[1, "new_tokens"] == runs[1]["new_tokens"] and df.loc[1, "tau"] >= 1.0
    assert "tok/s total" in format_batch_summary(df)


def test_tree_and_peer_drafters_refused(target):
    from harness.engine.scheduler import check_batchable

    with pytest.raises(UserError, match="batch-size 1"):
        check_batchable("hf-generate", build_drafter("hf-generate", target, RunConfig()))


def test_meter_per_row(target):
    from harness.meter.core import Meter
    from harness.records import METER_FIELDS

    got = {}
    drafter = build_drafter("layerskip", target, RunConfig(k=3, layerskip_layers=2))
    BatchDecoder(target, drafter, batch_size=2, max_new_tokens=8, k=3, temperature=0.0, seed=0, eos_ids=EOS,
                 new_meter=lambda: Meter("cpu", 64, 3),
                 on_finish=lambda p, fields, steps: got.setdefault(p.prompt_id, steps)).run(prompts()[:3])
    for steps in got.values():
        assert all(set(METER_FIELDS) <= set(s) and len(s["h_verify"]) == s["emitted"] for s in steps)
