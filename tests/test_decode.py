"""The speculative loop: every drafter equals `ar` token for token at temperature 0 in fp32; rollback
and records are consistent; a mismatched draft model is refused."""

import pytest
import torch
from conftest import tiny_model

from harness.engine.scheduler import decode
from harness.drafters.ar import AR
from harness.drafters.model import ARDraftModel, check_same_vocab, layerskip
from harness.drafters.ngram import NGram, lookup
from harness.errors import UserError
from harness.targets import build_target

PROMPTS = [
    [5, 9, 13, 17, 5, 9, 13, 40, 41, 42, 5, 9],
    list(range(60, 90)),
    [100, 101, 102, 103] * 5,
]


def drafters(target):
    draft = build_target(tiny_model(seed=3), None, "draft", "native", max_len=256)
    return {"ngram": NGram(), "layerskip": layerskip(target, 2), "model": ARDraftModel(draft, "model")}


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_outputs_equal_ar(backend, k):
    target = build_target(tiny_model(), None, "tiny", backend, max_len=256)
    for prompt in PROMPTS:
        ref = decode(target, AR(), prompt, max_new_tokens=40, k=k, temperature=0.0, seed=0, eos_ids=set())
        assert len(ref.new_ids) == 40 and all(s["accepted"] == 0 and s["emitted"] == 1 for s in ref.steps)
        for name, drafter in drafters(target).items():
            out = decode(target, drafter, prompt, max_new_tokens=40, k=k, temperature=0.0, seed=0, eos_ids=set())
            assert out.new_ids == ref.new_ids, f"{name} differs from ar"
            # records: one step per target forward; emitted tokens add up to the output (first token from prefill)
            assert 1 + sum(s["emitted"] for s in out.steps) == len(out.new_ids)
            assert all(0 <= s["accepted"] <= s["drafted"] <= k for s in out.steps)


def test_layerskip_with_all_layers_but_one_accepts_often():
    """A self-drafter that is nearly the target accepts most drafts: checks that acceptance is counted."""
    model = tiny_model(layers=4)
    target = build_target(model, None, "tiny", "native", max_len=256)
    out = decode(target, layerskip(target, 3), PROMPTS[1], max_new_tokens=40, k=4, temperature=0.0, seed=0,
                 eos_ids=set())
    tau = sum(s["emitted"] for s in out.steps) / len(out.steps)
    assert tau > 1.0


def test_eos_stops_and_is_kept():
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    ref = decode(target, AR(), PROMPTS[0], max_new_tokens=30, k=3, temperature=0.0, seed=0, eos_ids=set())
    stop = ref.new_ids[7]
    out = decode(target, NGram(), PROMPTS[0], max_new_tokens=30, k=3, temperature=0.0, seed=0, eos_ids={stop})
    first = ref.new_ids.index(stop)
    assert out.new_ids == ref.new_ids[:first + 1]


def test_sampling_is_seeded_and_reproducible():
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    a = decode(target, layerskip(target, 2), PROMPTS[1], max_new_tokens=30, k=3, temperature=1.0, seed=7, eos_ids=set())
    b = decode(target, layerskip(target, 2), PROMPTS[1], max_new_tokens=30, k=3, temperature=1.0, seed=7, eos_ids=set())
    c = decode(target, AR(), PROMPTS[1], max_new_tokens=30, k=3, temperature=1.0, seed=8, eos_ids=set())
    assert a.new_ids == b.new_ids
    assert a.new_ids != c.new_ids


def test_ngram_lookup_prefers_longest_recent_match():
    hist = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(hist, 2) == [7, 8]  # "2 3" most recently followed by 7 8
    assert lookup([4, 5, 6], 3) == []


def test_draft_model_with_other_vocabulary_is_refused():
    target = build_target(tiny_model(), None, "tiny", "native", max_len=64)
    other = build_target(tiny_model(vocab=300), None, "other", "native", max_len=64)
    with pytest.raises(UserError, match="vocabulary"):
        check_same_vocab(target, other)
