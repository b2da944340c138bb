"""Self-speculation by layer skipping (harness.drafters.selfspec): the skip view, the acceptance simulation
against real decoding, the search on a controlled model, equality with `ar` at temperature 0 (batch 1
and 4) and the target's distribution at temperature > 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from harness.config import RunConfig
from harness.drafters import build_drafter
from harness.drafters.ar import AR
from harness.drafters.selfspec import resolve_skip, skip_view
from harness.selfspec_search import (SearchConfig, Timings, candidate_sets, choose, choose_measured, search,
                                     simulate_chain)
from harness.engine.scheduler import Scheduler, decode
from harness.errors import UserError
from harness.runner import run_prompt
from harness.suites import Prompt
from harness.targets import build_target

PROMPTS = [
    [5, 9, 13, 17, 5, 9, 13, 40, 41, 42, 5, 9],
    list(range(60, 90)),
    [100, 101, 102, 103] * 5,
]
IDENTITY = (2, 3)


def identity_layers_model(layers: int = 6, identity=IDENTITY, **kw):
    """A tiny model whose layers in `identity` add nothing to the residual stream (attention output and MLP
    down projections zeroed): skipping exactly those layers leaves the model unchanged."""
    model = tiny_model(layers=layers, **kw)
    with torch.no_grad():
        for i in identity:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def test_skipping_identity_layers_gives_the_target_and_bad_sets_are_refused():
    target = build_target(identity_layers_model(), None, "tiny", "native", max_len=64)
    ids = torch.tensor([PROMPTS[0]])
    full = target.forward(ids).logits
    same = skip_view(target, IDENTITY).model.forward(ids).logits
    other = skip_view(target, (1, 4)).model.forward(ids).logits
    torch.testing.assert_close(same, full)
    assert not torch.allclose(other, full, atol=1e-3)
    assert skip_view(target, (4, 1)).model.num_layers == 4
    for bad in ((), (6,), (-1,), tuple(range(6))):
        with pytest.raises(UserError, match="--skip-layers"):
            skip_view(target, bad)


def test_simulate_chain_counts_runs_of_agreement():
    agree = np.array([0, 1, 1, 0, 1, 1, 1, 1, 0, 0], dtype=bool)  # position 0 comes from the prefill
    # K = 2: steps start at 1 (accepts 1, 2; emits 3), 4 (accepts 4, 5), 7 (accepts 7, rejects 8), 9
    assert simulate_chain(agree, 2) == [(2, 2), (2, 2), (1, 2), (0, 1)]  # the last step judges 1 draft
    assert simulate_chain(agree, 8) == [(2, 8), (4, 6), (0, 1)]
    assert simulate_chain(agree, 2, stop=5) == [(2, 2), (2, 2)]  # no step starts after 5 tokens were emitted
    assert simulate_chain(agree[:1], 3) == []


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_outputs_equal_ar(backend, k):
    target = build_target(tiny_model(), None, "tiny", backend, max_len=256)
    for skip in ((1,), (1, 2)):
        drafter = skip_view(target, skip)
        for prompt in PROMPTS:
            ref = decode(target, AR(), prompt, max_new_tokens=40, k=k, temperature=0.0, seed=0, eos_ids=set())
            out = decode(target, drafter, prompt, max_new_tokens=40, k=k, temperature=0.0, seed=0, eos_ids=set())
            assert out.new_ids == ref.new_ids
            assert all(0 <= s["accepted"] <= s["drafted"] == k for s in out.steps)


def test_batch_of_four_equals_batch_one():
    target = build_target(tiny_model(), byte_tokenizer(), "tiny", "native", max_len=256)
    texts = ("hi", "tell me a long story about cats", "abcabcabc abcabc abc", "x" * 30, "what is 2+2?", "zzz")
    prompts = [Prompt(f"p{i}", "c", "s", (t,)) for i, t in enumerate(texts)]
    prompts[1] = Prompt("p1", "c", "s", (texts[1], "and again, shorter"))
    cfg = RunConfig(k=3, max_new_tokens=12, temperature=0.0, meter=False, skip_layers="1,2")
    drafter = build_drafter("selfspec", target, cfg)
    ar = {p.prompt_id: run_prompt(cfg, target, AR(), p, {257})[0]["output_ids"] for p in prompts}
    got = {}
    dec = Scheduler(target, drafter, name="selfspec", batch_size=4, max_new_tokens=12, k=3, temperature=0.0, seed=0,
                    eos_ids={257}, catch=False,
                    on_finish=lambda p, fields, steps: got.setdefault(p.prompt_id, fields["output_ids"]))
    dec.run(prompts)
    assert got == ar


def test_search_picks_the_identity_layers_and_simulation_equals_decoding():
    """Layers 2 and 3 are identities: skipping both costs no acceptance, so with draft cost proportional to
    the kept layers (and a flat verify cost, as on a GPU) the set {2, 3} has the best predicted tok/s. The
    simulated acceptance equals what decoding each candidate measures, prompt by prompt."""
    target = build_target(identity_layers_model(), byte_tokenizer(), "tiny", "native", max_len=256)
    prompts = [Prompt(f"p{i}", "c", "s", (t,)) for i, t in enumerate(("tell me about cats", "abc abc abc"))]
    K = 4
    timings = Timings(t_forward={t: 1.0 for t in range(1, K + 2)}, t_accept={k: 0.0 for k in range(K + 1)},
                      t_draft={kept: {k: k * kept / 6 for k in range(1, K + 1)} for kept in range(1, 6)})
    cfg = SearchConfig(prompts=2, max_new_tokens=24, k_max=K, sizes=(0.2, 0.35, 0.5))
    result = search(target, cfg, prompts=prompts, timings=timings, measure=False)
    table = result["table"]
    assert result["skip"] == result["predicted_skip"] == list(IDENTITY) and result["chosen_by"] == "predicted_tok_s"
    chosen = [r["skip"] for r in table if r["chosen"]]
    assert chosen == [r["skip"] for r in table if r["predicted_best"]] == [list(IDENTITY)]
    assert max(r["predicted_tok_s"] for r in table) == next(r for r in table if r["chosen"])["predicted_tok_s"]
    result = search(target, cfg, prompts=prompts, timings=timings)  # now decoded and timed
    table = result["table"]
    assert result["predicted_skip"] == list(IDENTITY) and result["chosen_by"] == "measured_tok_s"
    assert result["layer_agreement"]["2"] == result["layer_agreement"]["3"] == 1.0
    assert any(r["agreement"] < 1 for r in table)  # other candidates lose acceptance
    for r in table:
        assert r["sim_accepted"] == r["measured_accepted"], r["skip"]
        assert r["measured_tok_s"] > 0 and "measured_speedup" in r
    best = next(r for r in table if r["predicted_best"])
    assert best["measured_accept_rate"] == 1.0 and best["k"] == K
    chosen = next(r for r in table if r["chosen"])
    assert chosen["measured_tok_s"] == max(r["measured_tok_s"] for r in table) and result["skip"] == chosen["skip"]


def test_search_chooses_the_best_measured_not_the_best_predicted(monkeypatch):
    """Injected decode timings in which the cost model's favourite ({2, 3}, the identity layers) is not the
    fastest: the search must choose the candidate of the best measured tok/s, record its K, and keep both
    figures for every candidate. A run's summary then names the chosen set."""
    import harness.selfspec_search as ss

    target = build_target(identity_layers_model(), byte_tokenizer(), "tiny", "native", max_len=256)
    prompts = [Prompt("p0", "c", "s", ("tell me about cats",))]
    K = 4
    timings = Timings(t_forward={t: 1.0 for t in range(1, K + 2)}, t_accept={k: 0.0 for k in range(K + 1)},
                      t_draft={kept: {k: k * kept / 6 for k in range(1, K + 1)} for kept in range(1, 6)})
    cfg = SearchConfig(prompts=1, max_new_tokens=12, k_max=K, sizes=(0.2, 0.35, 0.5), rounds=2)
    fake = {None: [10.0, 10.0], (2,): [3.0, 9.0], (2, 3): [5.0, 4.0]}  # tok/s per round
    calls = {}

    def fake_decode(target_, drafter, seqs, k, cfg_, eos):
        key = getattr(drafter, "skip", None)
        key = tuple(key) if key is not None else None
        n = calls.get(key, 0)
        calls[key] = n + 1
        tok_s = fake.get(key, [0.5, 0.5])[n]
        return dict(measured_tok_s=tok_s, measured_tau=1.0, measured_accept_rate=0.0, measured_accepted=[0])

    monkeypatch.setattr(ss, "timed_decode", fake_decode)
    result = search(target, cfg, prompts=prompts, timings=timings)
    table = {tuple(r["skip"]): r for r in result["table"]}
    assert {(2,), (2, 3)} <= set(table)
    assert result["predicted_skip"] == [2, 3] and table[(2, 3)]["predicted_best"]
    assert result["skip"] == [2] and result["k"] == table[(2,)]["k"] and table[(2,)]["chosen"]
    assert [s for s, r in table.items() if r["chosen"]] == [(2,)]
    assert table[(2,)]["measured_tok_s"] == 9.0 and table[(2, 3)]["measured_tok_s"] == 5.0  # fastest round kept
    assert result["ar_tok_s"] == 10.0 and table[(2,)]["measured_speedup"] == 0.9
    assert all("predicted_tok_s" in r and "measured_tok_s" in r for r in table.values())
    with pytest.raises(ValueError, match="no candidate was timed"):
        choose_measured([dict(skip=[1], predicted_tok_s=1.0)])
    assert choose_measured([dict(skip=[1, 2], measured_tok_s=3.0), dict(skip=[4], measured_tok_s=3.0),
                            dict(skip=[5], measured_tok_s=2.0)])["skip"] == [4]  # fewer skipped layers on ties


def test_summary_names_the_chosen_skip_set(tmp_path):
    from harness.reports.summary import selfspec_note

    assert selfspec_note(tmp_path) is None
    search = dict(chosen_by="measured_tok_s", ar_tok_s=10.0,
                  table=[dict(skip=[3, 7], chosen=True, measured_tok_s=5.8, predicted_tok_s=4.3),
                         dict(skip=[14, 15], chosen=False, measured_tok_s=4.7, predicted_tok_s=4.4)])
    cfg = dict(extra=dict(selfspec=dict(skip=[3, 7], searched_k=3, search=search)))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    note = selfspec_note(tmp_path)
    assert "layers 3,7 at K = 3" in note and "best measured tok/s of 2 candidates" in note and "5.8 tok/s" in note


def test_candidates_and_choice_on_a_given_table():
    scores = {1: 0.5, 2: 0.9, 3: 0.8, 4: 0.95, 5: 0.1}
    cands = candidate_sets(7, scores, SearchConfig(protect=1, sizes=(0.15, 0.3)))
    assert cands[0] == (4,) and (2, 4) in cands  # the least costly layers first
    assert all(1 <= min(c) and max(c) <= 5 for c in cands)  # layers 0 and 6 are protected
    assert (3,) in cands and (2, 3) in cands  # middle blocks
    rows = [dict(skip=[1], predicted_tok_s=2.0), dict(skip=[2, 3], predicted_tok_s=3.0),
            dict(skip=[4], predicted_tok_s=3.0)]
    assert choose(rows)["skip"] == [4]  # best predicted, fewer skipped layers on ties


def test_skip_layers_flag_reads_lists_and_search_files(tmp_path):
    target = build_target(tiny_model(), None, "tiny", "native", max_len=64)
    cfg = RunConfig()
    assert resolve_skip(target, "2, 1", cfg)[0] == (2, 1)
    path = tmp_path / "search.json"
    path.write_text(json.dumps(dict(skip=[1, 2], k=3, target="tiny", table=[])))
    drafter = build_drafter("selfspec", target, RunConfig(skip_layers=str(path)))
    assert drafter.skip == (1, 2) and drafter.k == 3
    with pytest.raises(UserError, match="not found"):
        resolve_skip(target, str(tmp_path / "missing.json"), cfg)
    path.write_text(json.dumps(dict(skip=[1], target="other")))
    with pytest.raises(UserError, match="target other"):
        resolve_skip(target, str(path), cfg)
    with pytest.raises(UserError, match="comma-separated"):
        resolve_skip(target, "two", cfg)


def test_own_k_from_the_search_is_used():
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    drafter = skip_view(target, (1,), k=2)
    out = decode(target, drafter, PROMPTS[1], max_new_tokens=20, k=5, temperature=0.0, seed=0, eos_ids=set())
    ref = decode(target, AR(), PROMPTS[1], max_new_tokens=20, k=5, temperature=0.0, seed=0, eos_ids=set())
    assert out.new_ids == ref.new_ids and {s["drafted"] for s in out.steps} == {2}


def test_sampling_keeps_the_target_distribution():
    """Temperature 0.8: the first three tokens over 600 seeds follow the target's joint distribution
    (chi-square); the draft skips an almost-identity layer, so drafts are both accepted and rejected."""
    from scipy.stats import chisquare

    V, T, n = 8, 0.8, 600
    model = identity_layers_model(layers=3, identity=(), vocab=V, eos_token_id=None, bos_token_id=None)
    with torch.no_grad():  # layer 1 nearly an identity: the draft is close to the target, not equal
        model.model.layers[1].self_attn.o_proj.weight.mul_(0.2)
        model.model.layers[1].mlp.down_proj.weight.mul_(0.2)
    target = build_target(model, None, "tiny", "native", max_len=64)
    prompt = [1, 5, 7, 2, 3]
    with torch.no_grad():
        grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V*V, 2]
        ids = torch.cat([torch.tensor(prompt).expand(V * V, -1), grid], 1)
        p = torch.softmax(model(ids).logits.double() / T, -1)  # [V*V, 7, V]
        joint = (p[:, 4].gather(1, grid[:, :1]) * p[:, 5].gather(1, grid[:, 1:]))[:, :, None] * p[:, 6][:, None]
    counts = torch.zeros(V ** 3)
    accepted = drafted = 0
    for seed in range(n):
        out = decode(target, skip_view(target, (1,)), prompt, max_new_tokens=3, k=2, temperature=T, seed=seed,
                     eos_ids=set())
        t1, t2, t3 = out.new_ids[:3]
        counts[(t1 * V + t2) * V + t3] += 1
        accepted += sum(s["accepted"] for s in out.steps)
        drafted += sum(s["drafted"] for s in out.steps)
    assert 0.2 * drafted < accepted < 0.95 * drafted
    expected = joint.flatten().float() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3
