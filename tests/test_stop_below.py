"""Chains that stop on the head's confidence (`eagle3:k=K:stop_below=P`): a row keeps drafting while the
product of the head's probabilities of its drafts stays >= P. The rule as written (tokens = a prefix of
the full chain, its length from the head's own q), output equal to ar's at T = 0 at batch 1 and 4, and the
refusals. The distribution at T > 0 is chi-squared in test_lossless_b (case eagle3-stop)."""

import math

import pytest
import torch
from conftest import tiny_model
from test_eagle import one_layer_model, oracle_head, random_head

from harness.config import RunConfig
from harness.drafters import build_drafter, parse_variant
from harness.drafters.ar import AR
from harness.drafters.base import DraftContext
from harness.drafters.eagle import EagleDrafter, build_eagle
from harness.drafters.heads import save_head
from harness.engine.scheduler import Scheduler
from harness.errors import UserError
from harness.suites import Prompt
from harness.targets import build_target

STOP = 0.5
PROMPTS = [[1, 5, 9, 2, 7, 3, 8, 4, 6, 5, 9], [40, 41, 42, 43, 40, 41], [7, 7, 7, 7], [100, 3, 200, 3, 100, 3, 200],
           [12, 250, 31, 9, 64, 2, 2, 2, 18], [5, 6], [230, 1, 230, 1, 230], [88, 17, 88, 17, 44, 90, 13]]


@pytest.fixture(scope="module")
def setup():
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    head, frozen = random_head(target, "eagle3", draft_vocab=60, scale=4.0)  # q's top entry spans ~0.1 to 1
    return target, head, frozen


def first_proposal(target, head, frozen, prompt, stop, want_q, k=5):
    target.reset(1)
    out = target.forward(torch.tensor([prompt[:-1]]), hidden_layers=tuple(head.cfg.layers))
    target.commit(torch.tensor([len(prompt) - 1]))
    ctx = DraftContext(history=[list(prompt)], k=k, temperature=0.0, seed=0, device=target.device,
                       prefill_hidden=out.hidden, want_q=want_q)
    drafter = EagleDrafter(head, frozen, "eagle3", None, 256, target.device, stop_below=stop)
    drafter.begin(ctx)
    drafter.begin_row(ctx, 0)
    return drafter.propose(ctx)


def test_a_row_drafts_while_its_chain_probability_stays_above_the_floor(setup):
    """Against the full chain (stop_below 0, q returned): the stopped chain is its first n tokens, n the
    number of leading drafts whose running product of q(draft) is >= P; the same with and without q."""
    target, head, frozen = setup
    seen = set()
    for prompt in PROMPTS:
        full = first_proposal(target, head, frozen, prompt, 0.0, want_q=True)
        assert full.num_draft is None and full.tokens.shape == (1, 5)
        probs = full.q[0].gather(-1, full.tokens[0][:, None])[:, 0].double()
        n = int((torch.cumprod(probs, 0) >= STOP).to(torch.long).cumprod(0).sum())
        seen.add(n)
        for want_q in (True, False):
            got = first_proposal(target, head, frozen, prompt, STOP, want_q)
            assert got.num_draft.tolist() == [n] and got.num_draft_host == [n]
            assert got.tokens.shape[1] == n  # the step ends when the row stops: no wider verify than needed
            assert got.tokens[0].tolist() == full.tokens[0, :n].tolist()
            if want_q and n:
                torch.testing.assert_close(got.q[0], full.q[0, :n])
    assert len(seen) >= 3, f"the prompts should stop the chain at several lengths, saw {sorted(seen)}"


def decode_all(target, drafter, batch_size, k=5):
    """Outputs and per-prompt step records by prompt id."""
    got, steps = {}, {}

    def finish(p, fields, st):
        got[p.prompt_id] = fields["output_ids"]
        steps[p.prompt_id] = st

    sched = Scheduler(target, drafter, name="d", batch_size=batch_size, max_new_tokens=24, k=k, temperature=0.0,
                      seed=0, eos_ids=set(), catch=False, encode=lambda seq: list(PROMPTS[int(seq.prompt.prompt_id)]),
                      on_finish=finish)
    sched.run([Prompt(str(i), "c", "s", ("",)) for i in range(len(PROMPTS))])
    return got, steps


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("kind", ["random-eagle3", "oracle-eagle"])
def test_stopped_chains_equal_ar(setup, kind, batch_size):
    """T = 0, fp32: every prompt's output equals ar's, and at batch 4 each prompt drafts and accepts what
    it did at batch 1 (a row's stop depends on its own chain alone). The random eagle3 head stops its
    chains at every length 0..K; the oracle eagle head of a bigram target (q = p, whose top entry is
    ~0.1-0.3) at stop_below 0.05 drafts 0, 1 or 2 tokens and most of its drafts are accepted."""
    if kind == "random-eagle3":
        target, head, frozen = setup
        stop, variant = STOP, "eagle3"
    else:
        model = one_layer_model(0.0)
        target = build_target(model, None, "bigram", "native", max_len=256)
        (head, frozen), stop, variant = oracle_head(target, "eagle", model), 0.05, "eagle"
    ref, _ = decode_all(target, AR(), 1)
    make = lambda: EagleDrafter(head, frozen, variant, None, 256, target.device, stop)  # noqa: E731
    got, by_prompt = decode_all(target, make(), batch_size)
    assert got == ref
    if batch_size > 1:
        trace = lambda st: {p: [(s["drafted"], s["accepted"]) for s in v] for p, v in st.items()}  # noqa: E731
        assert trace(by_prompt) == trace(decode_all(target, make(), 1)[1])
    steps = [s for v in by_prompt.values() for s in v]
    depths = {s["depth"] for s in steps}
    accepted = sum(s["accepted"] for s in steps)
    if kind == "random-eagle3":
        assert depths == {0, 1, 2, 3, 4, 5}, sorted(depths)
    else:
        assert {0, 1} <= depths and max(depths) < 5 and accepted > 40, (sorted(depths), accepted)


def test_stop_below_is_refused_where_it_does_not_apply(setup, tmp_path):
    target, head, _ = setup
    save_head(head, tmp_path / "h")
    assert parse_variant("eagle3:k=4:stop_below=0.3") == ("eagle3", {"k": 4, "stop_below": 0.3})
    with pytest.raises(UserError, match="stop_below is for eagle and eagle3 chains"):
        parse_variant("ngram:stop_below=0.3")
    with pytest.raises(UserError, match="applies to chains"):
        build_eagle("eagle3", target, RunConfig(head=str(tmp_path / "h"), depth=3, stop_below=0.3))
    with pytest.raises(UserError, match=r"in \[0, 1\)"):
        build_eagle("eagle3", target, RunConfig(head=str(tmp_path / "h"), total_tokens=0, stop_below=1.5))
    d = build_drafter("eagle3:k=3:total_tokens=0:stop_below=0.25", target, RunConfig(head=str(tmp_path / "h")))
    assert d.stop_below == 0.25 and d.tree is None
    assert math.isclose(build_drafter("eagle3", target, RunConfig(head=str(tmp_path / "h"))).stop_below, 0.0)
