"""ShareGPT training data: the suite-overlap filter, the chat-template answer mask, feature shards (lined up
with the target, resumable, keyed), and the mt-bench suite."""

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from harness.errors import UserError
from harness.suites import load_suite
from harness.targets import build_target
from harness.training import features, sharegpt
from harness.training.sharegpt import NGRAM, SuiteFilter, chat_ids


class WordTokenizer:
    """Whitespace words -> stable ids (what SuiteFilter needs: __call__ with add_special_tokens)."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


def test_filter_drops_conversations_sharing_an_8_token_run_with_a_suite():
    f = SuiteFilter.for_suites(WordTokenizer())
    assert len(f.banned) > 1000
    words = load_suite("mt-bench")[0].turns[0].split()
    assert len(words) > NGRAM + 2
    run8 = " ".join(words[2:2 + NGRAM])
    run7 = " ".join(words[2:2 + NGRAM - 1])
    user = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "fine answer"}]  # noqa: E731
    assert not f.keep(user(f"please zebra {run8} thanks"))
    assert f.keep(user(f"please zebra {run7} thanks"))
    assert not f.keep([{"role": "user", "content": "hello"}, {"role": "assistant", "content": f"so {run8}"}])
    assert (f.examined, f.dropped) == (3, 2)
    humaneval_free = SuiteFilter(WordTokenizer())  # an empty filter keeps everything
    assert humaneval_free.keep(user(run8))


def test_chat_ids_mask_the_assistant_turns(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok!"}]
    ids, answer = chat_ids(tok, turns, 512)
    assert ids == sharegpt._template(tok, turns, add_generation_prompt=False)
    assert tok.decode(ids).startswith("<|im_start|>user\nhi<|im_end|>")
    text = tok.decode([t for t, a in zip(ids, answer) if a])
    assert text == "yo<|im_end|>\nok!<|im_end|>\n"
    short, short_answer = chat_ids(tok, turns, 40)  # whole turns only: the second exchange does not fit
    assert tok.decode([t for t, a in zip(short, short_answer) if a]) == "yo<|im_end|>\n"


FAKE = [(f"c{i}", [{"role": "user", "content": f"Question number {i}: tell me about item {i * 7}."},
                   {"role": "assistant", "content": f"Item {i * 7} is a thing. " * (1 + i % 3)}]) for i in range(40)]


@pytest.fixture
def fake_source(monkeypatch):
    monkeypatch.setattr(features, "conversations", lambda seed: list(FAKE))
    monkeypatch.setattr(features.SuiteFilter, "for_suites", classmethod(lambda cls, tok: cls(tok)))
    monkeypatch.setattr(features, "SHARD_TOKENS", 200)


def _extract(target, folder, mode, budget):
    key = features.feature_key("fp", (1, 3), 256, 12, 0)
    return features.extract(target, folder, mode, budget, (1, 3), key, max_len=256, max_new_tokens=12,
                            gen_batch=4, seed=0, eos=set())


@pytest.mark.parametrize("mode", ["teacher", "self"])
def test_feature_shards_line_up_and_resume(tmp_path, fake_source, mode):
    target = build_target(tiny_model(layers=4), byte_tokenizer(), "tiny", "native",
                          max_len=512)
    full = _extract(target, tmp_path / "full", mode, 1500)
    part = _extract(target, tmp_path / "part", mode, 600)  # an interrupted run ...
    assert part["shards"] >= 2 and part["tokens"] < full["tokens"]
    (tmp_path / "part" / f"{mode}-99999.pt.tmp").write_bytes(b"half a shard")  # ... that died mid-write
    again = _extract(target, tmp_path / "part", mode, 1500)  # ... resumed
    assert {k: again[k] for k in ("next", "tokens", "conversations")} == \
           {k: full[k] for k in ("next", "tokens", "conversations")}
    a_tr, a_he, _ = features.load(tmp_path / "full", [mode])
    b_tr, b_he, _ = features.load(tmp_path / "part", [mode])
    assert [r["cid"] for r in a_tr + a_he] == [r["cid"] for r in b_tr + b_he]
    for ra, rb in zip(a_tr + a_he, b_tr + b_he):
        assert torch.equal(ra["ids"], rb["ids"]) and torch.equal(ra["feats"], rb["feats"])
    # every record is the target's own: features and p of one prefill over the record's tokens
    rec = a_tr[0]
    target.reset(1)
    out = target.forward(rec["ids"][None, :-1], hidden_layers=(1, 3))
    torch.testing.assert_close(rec["feats"][:, 1].float(), out.hidden[3][0], atol=0.05, rtol=0.02)
    assert torch.equal(rec["p_ids"][:, 0], out.logits[0].argmax(-1))
    assert rec["answer"].any() and not rec["answer"][0]
    if mode == "self":  # self-distilled: the answer is the target's greedy continuation
        assert torch.equal(rec["ids"][rec["answer"]], rec["p_ids"][rec["answer"][1:], 0])
    with pytest.raises(UserError, match="other settings"):
        features.extract(target, tmp_path / "full", mode, 2000, (1, 3), features.feature_key("fp", (0, 3), 256, 12, 0),
                         max_len=256, max_new_tokens=12, gen_batch=4, seed=0, eos=set())


def test_mt_bench_suite_has_80_two_turn_questions():
    prompts = load_suite("mt-bench")
    assert len(prompts) == 80 and all(len(p.turns) == 2 for p in prompts)
    cats = {p.category for p in prompts}
    assert cats == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
    assert len({p.prompt_id for p in prompts}) == 80 and prompts[0].prompt_id == "mt-bench/81"
    assert all(p.suite == "mt-bench" for p in prompts)
    assert len(load_suite("mt-bench", per_category=1)) == 8


def test_sharegpt_conversations_alternate_and_are_shuffled_by_seed():
    convs = sharegpt.conversations(0)
    assert len(convs) > 10_000
    for _, turns in convs[:200]:
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2) + ["user"] * (len(turns) % 2)
    assert [c[0] for c in convs[:50]] == [c[0] for c in sharegpt.conversations(0)[:50]]
    assert [c[0] for c in convs[:50]] != [c[0] for c in sharegpt.conversations(1)[:50]]
    json.dumps(convs[0])  # plain data
