"""Suffix decoding (harness.drafters.suffix): the suffix trie (matches, counts, incremental updates), the
adaptive tree, rows joining and leaving, equality with `ar` at temperature 0 and the target's
distribution at temperature > 0."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from harness.drafters.ar import AR
from harness.drafters.base import Committed, DraftContext
from harness.drafters.suffix import SuffixConfig, SuffixDrafter, SuffixTrie
from harness.engine.scheduler import decode
from harness.targets import build_target

FREE = dict(verify_overhead=0.0, verify_per_node=0.0)  # verifying costs nothing: every tree proposed whole
PROMPTS = [
    [5, 9, 13, 17, 5, 9, 13, 40, 41, 42, 5, 9],
    list(range(60, 90)),
    [100, 101, 102, 103] * 5,
]


def substrings(seq, D):
    out = {}
    for i in range(len(seq)):
        for j in range(i + 1, min(len(seq), i + D) + 1):
            out[tuple(seq[i:j])] = out.get(tuple(seq[i:j]), 0) + 1
    return out


def trie_counts(trie):
    out, stack = {}, [(0, ())]
    while stack:
        n, path = stack.pop()
        if path:
            out[path] = trie.count[n]
        for tok, c in (trie.children[n] or {}).items():
            stack.append((c, path + (tok,)))
    return out


def test_trie_counts_every_substring_up_to_its_depth_incrementally():
    seq = [1, 2, 3, 1, 2, 4, 1, 2, 3, 3]
    whole = SuffixTrie(4)
    whole.extend(seq)
    assert trie_counts(whole) == substrings(seq, 4)
    pieces = SuffixTrie(4)  # token by token, as committed tokens arrive
    for t in seq:
        pieces.extend([t])
    assert trie_counts(pieces) == trie_counts(whole)
    assert whole.count[whole.find([1, 2])] == 3 and whole.find([2, 1]) is None
    assert whole.size == len(seq)


def test_sequences_do_not_join_across_a_boundary():
    trie = SuffixTrie(4)
    trie.extend([1, 2])
    trie.start_sequence()
    trie.extend([3, 4])
    assert trie.find([2, 3]) is None and trie.find([3, 4]) is not None
    assert trie_counts(trie) == {**substrings([1, 2], 4), **substrings([3, 4], 4)}


def test_match_is_the_longest_suffix_with_a_continuation():
    trie = SuffixTrie(8)
    ctx = [7, 1, 2, 3, 9, 9, 2, 3, 5, 1, 2, 3]
    trie.extend(ctx)
    node, m = trie.match(ctx, max_match=6)
    assert m == 3 and trie.children[node] and set(trie.children[node]) == {9}  # "1 2 3" was followed by 9
    node, m = trie.match(ctx, max_match=2)
    assert m == 2 and set(trie.children[node]) == {9, 5}  # "2 3": followed by 9 and by 5
    assert trie.match([4, 4], 4) == (-1, 0)  # never seen


def test_expand_is_best_first_with_counts_and_respects_budget_and_min_prob():
    trie = SuffixTrie(8)
    for cont in ([5, 6], [5, 6], [5, 7], [8, 9]):  # after "1": 5 three times, 8 once
        trie.start_sequence()
        trie.extend([1] + cont)
    node = trie.find([1])
    toks, pars, deps, scores = trie.expand(node, budget=10, min_prob=0.0, max_depth=4)
    assert toks[0] == 5 and scores[0] == pytest.approx(0.75)
    assert scores == sorted(scores, reverse=True)  # best first
    by = {(t, d): s for t, d, s in zip(toks, deps, scores)}
    assert by[(6, 2)] == pytest.approx(0.75 * 2 / 3) and by[(8, 1)] == pytest.approx(0.25)
    assert all(p < i for i, p in enumerate(pars))  # a parent comes before its children
    assert len(trie.expand(node, budget=2, min_prob=0.0, max_depth=4)[0]) == 2
    assert trie.expand(node, budget=10, min_prob=0.3, max_depth=4)[0] == [5, 6]  # 0.75, 0.5; 0.25 dropped
    # the match-length confidence m / (m + prior) lowers every factor; longer matches are trusted more
    short = trie.expand(node, 10, 0.0, 4, match_len=1, prior=2.0)[3]
    long = trie.expand(node, 10, 0.0, 4, match_len=6, prior=2.0)[3]
    assert short[0] == pytest.approx(0.75 / 3) and long[0] == pytest.approx(0.75 * 6 / 8)


def test_tree_size_adapts_to_the_match_length():
    cfg = SuffixConfig(max_match=8, max_depth=12, max_nodes=50, alpha=1.0, min_prob=0.0, prior=0.0, global_prior=0.0,
                       **FREE)
    d = SuffixDrafter(cfg)
    body = list(range(10, 30))
    short_ctx = body + [99, 10]  # "10" matched: 1 token
    long_ctx = body + [99] + body[:5]  # "10 .. 14" matched: 5 tokens
    assert len(d.tree_for(short_ctx)[0]) == 1
    toks = d.tree_for(long_ctx)[0]
    assert len(toks) == 5 and toks == body[5:10]


def ctx_of(histories):
    return DraftContext(history=[list(h) for h in histories], k=4, temperature=0.0, seed=0, device=torch.device("cpu"))


def test_global_trie_learns_finished_outputs_and_wins_when_it_matches_better():
    cfg = SuffixConfig(**FREE, prior=0.0, global_prior=0.0)
    d = SuffixDrafter(cfg)
    answer = [40, 41, 42, 43, 44, 45]
    ctx = ctx_of([[1, 2, 3] + answer])  # a prompt of 3 tokens plus its answer (the first token emitted at begin)
    d.begin(ctx_of([[1, 2, 3, answer[0]]]))
    d.observe(ctx, Committed(num_accepted=torch.zeros(1), accepted=[0], emitted=[answer[1:]]))
    assert d.global_trie.size == 0  # not yet: the turn is still going
    d.begin(ctx_of([[7, 8, 40, 41]]))  # the next prompt starts: the answer joins the global trie
    assert d.global_trie.size == len(answer) - 1 + 1  # the answer (prompt excluded; first token included)
    toks, pars, deps, source = d.tree_for([7, 8, 40, 41], d.rows[0])
    assert source == "global" and toks[:4] == [42, 43, 44, 45]


def rows_of(prop) -> list[tuple[list, list, list]]:
    """Per row (draft tokens, parents as node indices with 0 = root, depths) of a tree or chain proposal."""
    if prop.is_tree:
        return [(prop.tokens[b, 1:n].tolist(), prop.parents[b, 1:n].tolist(), prop.depth[b, 1:n].tolist())
                for b, n in enumerate(prop.num_nodes.tolist())]
    return [(prop.tokens[b, :n].tolist(), list(range(n)), list(range(1, n + 1)))
            for b, n in enumerate(prop.num_draft_host)]


def test_rows_join_leave_and_batch_proposals_equal_one_row_proposals():
    cfg = SuffixConfig(**FREE, prior=0.0, global_prior=0.0)
    hists = [PROMPTS[0], PROMPTS[2], [1, 2, 3, 1, 2], PROMPTS[1][:8] + PROMPTS[1][:3]]
    batch = SuffixDrafter(cfg)
    batch.begin(ctx_of(hists))
    prop = batch.propose(ctx_of(hists))
    assert prop.is_tree and prop.tokens.shape[0] == 4
    for b, h in enumerate(hists):
        one = SuffixDrafter(cfg)
        one.begin(ctx_of([h]))
        p1 = one.propose(ctx_of([h]))
        assert rows_of(prop)[b] == rows_of(p1)[0]
        assert prop.tokens[b, 0] == h[-1]
    # keep_rows: row i takes what row rows[i] held; the rows that left give their output to the global trie
    ctx = ctx_of(hists)
    for h in ctx.history:
        h.extend([250, 251])
    batch.observe(ctx, Committed(num_accepted=torch.zeros(4), accepted=[0] * 4, emitted=[[250, 251]] * 4))
    batch.keep_rows([3, 1])
    assert [r.tokens for r in batch.rows] == [ctx.history[3], ctx.history[1]]
    assert batch.global_trie.find([250, 251]) is not None
    # begin_row: a new sequence in row 1 replaces that row's state only
    ctx2 = ctx_of([ctx.history[3], [9, 9, 9]])
    batch.begin_row(ctx2, 1)
    assert batch.rows[1].tokens == [9, 9, 9] and batch.rows[0].tokens == ctx.history[3]


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_greedy_outputs_equal_ar(backend):
    """Several prompts through one drafter (so the global trie is in use too), default and eager settings."""
    target = build_target(tiny_model(), None, "tiny", backend, max_len=256)
    for cfg in (SuffixConfig(), SuffixConfig(**FREE, prior=0.0, global_prior=0.0, alpha=4.0, max_nodes=16)):
        drafter = SuffixDrafter(cfg)
        accepted = 0
        for prompt in PROMPTS + PROMPTS:
            ref = decode(target, AR(), prompt, max_new_tokens=40, k=4, temperature=0.0, seed=0, eos_ids=set())
            out = decode(target, drafter, prompt, max_new_tokens=40, k=4, temperature=0.0, seed=0, eos_ids=set())
            assert out.new_ids == ref.new_ids
            assert 1 + sum(s["emitted"] for s in out.steps) == len(out.new_ids)
            assert all(0 <= s["accepted"] <= s["depth"] <= s["drafted"] for s in out.steps)
            accepted += sum(s["accepted"] for s in out.steps)
        assert accepted > 40  # the second pass over the prompts copies the first answers


def test_sampling_keeps_the_target_distribution():
    """Temperature 0.8: the first three tokens over 800 seeds follow the target's joint distribution
    (chi-square). One drafter decodes every seed, so its global trie holds the earlier samples and proposes
    trees with siblings; drafts are both accepted and rejected."""
    from scipy.stats import chisquare

    V, T, n = 6, 0.8, 800
    model = tiny_model(vocab=V, eos_token_id=None, bos_token_id=None, initializer_range=0.05)
    target = build_target(model, None, "tiny", "native", max_len=64)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    with torch.no_grad():  # exact joint p(t1) p(t2 | t1) p(t3 | t1, t2) at temperature T
        grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V*V, 2]
        ids = torch.cat([torch.tensor(prompt).expand(V * V, -1), grid], 1)
        p = torch.softmax(model(ids).logits.double() / T, -1)  # [V*V, 10, V]
        L = len(prompt)
        joint = (p[:, L - 1].gather(1, grid[:, :1]) * p[:, L].gather(1, grid[:, 1:]))[:, :, None] * p[:, L + 1][:, None]
    drafter = SuffixDrafter(SuffixConfig(**FREE, prior=0.0, global_prior=0.0, min_prob=0.0, alpha=4.0, max_nodes=6))
    siblings = 0
    original = drafter.propose

    def propose(ctx):
        nonlocal siblings
        prop = original(ctx)
        if prop.is_tree:  # a single path comes as a chain
            par = prop.parents[0, 1:int(prop.num_nodes[0])].tolist()
            siblings += any(par.count(x) > 1 for x in set(par))
        return prop

    drafter.propose = propose
    counts = torch.zeros(V ** 3)
    accepted = drafted = 0
    for seed in range(n):
        out = decode(target, drafter, prompt, max_new_tokens=3, k=2, temperature=T, seed=seed, eos_ids=set())
        t1, t2, t3 = out.new_ids[:3]
        counts[(t1 * V + t2) * V + t3] += 1
        accepted += sum(s["accepted"] for s in out.steps)
        drafted += sum(s["drafted"] for s in out.steps)
    assert siblings > n // 4  # multi-draft trees were verified
    assert 0.1 * n < accepted < drafted  # drafts are both accepted and rejected
    expected = joint.flatten().float() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_corpus_file_fills_the_global_trie_and_bad_lines_are_refused(tmp_path):
    from conftest import byte_tokenizer

    from harness.drafters.suffix import read_corpus
    from harness.errors import UserError

    tok = byte_tokenizer()
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "the quick brown fox"}\n"jumps over"\n')
    corpus = read_corpus(str(path), tok)
    assert corpus == [tok("the quick brown fox")["input_ids"], tok("jumps over")["input_ids"]]
    d = SuffixDrafter(SuffixConfig(**FREE, prior=0.0, global_prior=0.0), corpus)
    ctx = tok("a quick b")["input_ids"]
    toks, _, _, source = d.tree_for(ctx)
    assert source == "global" and toks[:3] == tok("row")["input_ids"]  # " b" -> "rown fox"
    path.write_text('{"text": 3}\n')
    with pytest.raises(UserError, match="corpus.jsonl:1"):
        read_corpus(str(path), tok)
    with pytest.raises(UserError, match="not found"):
        read_corpus(str(tmp_path / "none.txt"), tok)


def test_tree_is_the_prefix_with_most_expected_tokens_per_verify_cost():
    """(1 + S_n) / (1 + overhead + per_node * n) over best-first prefixes: the argmax is proposed, nothing
    when no prefix beats a plain forward; free verification proposes the whole tree."""
    d = SuffixDrafter(SuffixConfig(verify_overhead=0.6, verify_per_node=0.07))
    scores = [0.9, 0.8, 0.7, 0.1]
    gains = [(1 + sum(scores[:n])) / (1.6 + 0.07 * n) for n in range(1, 5)]
    assert d.best_prefix(scores) == (3, pytest.approx(max(gains))) and gains.index(max(gains)) == 2
    assert d.best_prefix([0.3, 0.1]) == (0, 1.0)  # 1.3 / 1.67 < 1: a weak guess costs more than it earns
    assert SuffixDrafter(SuffixConfig(**FREE)).best_prefix([0.3, 0.1])[0] == 2
    body = list(range(10, 30))
    weak = body + [99, 10]  # one matched token: low confidence
    strong = body + [99] + body[:6]  # six matched tokens
    assert d.tree_for(weak)[3] == "none" and d.tree_for(weak)[0] == []
    assert SuffixDrafter(SuffixConfig(**FREE, prior=0.0, global_prior=0.0, alpha=4.0)).tree_for(weak)[0] == body[1:5]
    toks, pars, deps, source = d.tree_for(strong)
    assert source == "local" and toks == body[6:6 + len(toks)] and len(toks) >= 4  # a confident chain, deep


def test_shipped_corpus_holds_no_bench_prompt():
    """The shipped corpus (SmolLM2's own answers) must not contain answers to prompts a bench preset
    measures (mini prompts 1-2 of each category), and --suffix-corpus smollm2 reads it."""
    import json
    from importlib import resources

    from conftest import byte_tokenizer

    from harness.config import PRESETS
    from harness.drafters.suffix import read_corpus

    text = resources.files("harness.suites").joinpath("suffix_corpus_smollm2.jsonl").read_text(encoding="utf-8")
    ids = [json.loads(line)["prompt_id"] for line in text.splitlines()]
    measured = {f"mini/{c}/0{i}" for c in ("chat", "code", "math", "summarization", "qa") for i in (1, 2)}
    assert ids and not measured & set(ids)
    assert all(p.get("per_category", 99) <= 2 for p in PRESETS.values() if p.get("suffix_corpus") == "smollm2")
    docs = read_corpus("smollm2", byte_tokenizer())
    assert len(docs) == len(ids) and all(docs)


def test_global_structure_has_its_own_prior():
    """global_prior discounts global matches only: a huge one silences the global trie and leaves the
    local one as it was."""
    corpus = [[40, 41, 42, 43, 44, 45]]
    base = dict(FREE, prior=0.0, min_prob=0.1, alpha=4.0)
    assert SuffixDrafter(SuffixConfig(**base, global_prior=0.0), corpus).tree_for([7, 8, 40, 41])[3] == "global"
    assert SuffixDrafter(SuffixConfig(**base, global_prior=1e6), corpus).tree_for([7, 8, 40, 41])[3] == "none"
    local = [40, 41, 42, 43, 9, 40, 41]
    assert SuffixDrafter(SuffixConfig(**base, global_prior=1e6), corpus).tree_for(local)[:1] == ([42, 43, 9, 40, 41],)


def test_verify_cost_flag_sets_the_cost_model_and_bad_values_are_refused():
    from harness.config import RunConfig
    from harness.drafters import build_drafter
    from harness.errors import UserError

    target = build_target(tiny_model(), None, "tiny", "native", max_len=64)
    d = build_drafter("suffix", target, RunConfig(suffix_verify_cost="0,0.5"))
    assert (d.cfg.verify_overhead, d.cfg.verify_per_node) == (0.0, 0.5)
    default, shipped = build_drafter("suffix", target, RunConfig()).cfg, SuffixConfig()
    assert (default.verify_overhead, default.verify_per_node) == (shipped.verify_overhead, shipped.verify_per_node)
    for bad in ("0.6", "a,b", "-1,0"):
        with pytest.raises(UserError, match="--suffix-verify-cost"):
            build_drafter("suffix", target, RunConfig(suffix_verify_cost=bad))


def test_single_paths_are_proposed_as_a_ragged_chain_and_branches_as_a_tree():
    """A step whose every row drafts one path (or nothing) is a ragged chain with those tokens; a row with
    siblings makes the step a tree again. Both decide as the tree would (test_greedy_outputs_equal_ar)."""
    cfg = SuffixConfig(**FREE, prior=0.0, global_prior=0.0, min_prob=0.0)
    path_row = [5, 6, 7, 8, 9, 5, 6]  # 5 6 -> 7 8 9 5 6: one continuation
    branch_row = [1, 2, 3, 1, 2, 4, 1, 2]  # 1 2 -> 3 or 4: siblings
    empty_row = [30, 31, 32]  # nothing repeats: no draft
    d = SuffixDrafter(cfg)
    d.begin(ctx_of([path_row, empty_row]))
    prop = d.propose(ctx_of([path_row, empty_row]))
    assert not prop.is_tree and prop.num_draft_host == [len(prop.tokens[0]), 0]
    toks, pars, _, _ = d.tree_for(path_row, d.rows[0])
    assert pars == list(range(-1, len(pars) - 1)) and prop.tokens[0].tolist() == toks and toks[:3] == [7, 8, 9]
    d = SuffixDrafter(cfg)
    d.begin(ctx_of([path_row, branch_row]))
    prop = d.propose(ctx_of([path_row, branch_row]))
    assert prop.is_tree
    n = int(prop.num_nodes[1])
    par = prop.parents[1, 1:n].tolist()
    assert any(par.count(x) > 1 for x in set(par))
