"""Unit tests of the meter (stats, observe/flush bookkeeping) and of the n-gram base (CPU)."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from harness.meter import ngram_base
from harness.meter.core import Meter, row_stats, step_stats
from harness.meter.ngram_base import NgramBase
from harness.records import METER_FIELDS


def _rand_pq(R, V, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, V, generator=g, dtype=torch.float64) * scale
    q = torch.softmax(torch.randn(R, V, generator=g, dtype=torch.float64) * scale, -1)
    ids = torch.randint(0, V, (R,), generator=g)
    return logits, q, ids


# ------------------------------------------------------------------ stats
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.6])
def test_row_stats_matches_numpy(temperature):
    logits, q, ids = _rand_pq(6, 9, seed=1)
    got = row_stats(logits, q, ids, temperature)
    t = temperature if temperature > 0 else 1.0
    z = logits.numpy() / t
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    qn = q.numpy()
    r = np.arange(6)
    np.testing.assert_allclose(got["p_draft"].numpy(), p[r, ids.numpy()], rtol=1e-12)
    np.testing.assert_allclose(got["q_draft"].numpy(), qn[r, ids.numpy()], rtol=1e-12)
    np.testing.assert_allclose(got["entropy_p"].numpy(), -(p * np.log(p)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(got["entropy_q"].numpy(), -(qn * np.log(qn)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(got["kl"].numpy(), (p * np.log(p / qn)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(got["alpha"].numpy(), np.minimum(p, qn).sum(1), rtol=1e-12)


def test_row_stats_one_hot_drafter():
    logits, _, ids = _rand_pq(4, 5, seed=2)
    got = row_stats(logits, None, ids, 1.0)
    p = torch.softmax(logits, -1)
    assert torch.allclose(got["alpha"], p[torch.arange(4), ids])          # sum min(p, onehot) = p(x)
    assert torch.all(got["q_draft"] == 1) and torch.all(got["entropy_q"] == 0)
    assert torch.isnan(got["kl"]).all()


def test_identities_alpha_tv_pinsker():
    for seed, scale in [(3, 0.3), (4, 3.0), (5, 12.0)]:
        logits, q, ids = _rand_pq(200, 11, seed=seed, scale=scale)
        s = row_stats(logits, q, ids, 1.0)
        p = torch.softmax(logits, -1)
        tv = 0.5 * (p - q).abs().sum(-1)                                   # computed independently
        assert torch.allclose(s["alpha"], 1 - tv, atol=1e-12)
        assert torch.all(tv <= torch.sqrt(s["kl"] / 2) + 1e-12)           # Pinsker
        assert torch.all(s["kl"] >= -1e-12)
    same = row_stats(torch.log(q), q, ids, 1.0)                           # p = q: kl 0, alpha 1
    assert torch.allclose(same["kl"], torch.zeros(200, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(same["alpha"], torch.ones(200, dtype=torch.float64), atol=1e-12)


def test_step_stats_ragged_layout():
    nd = torch.tensor([2, 0, 3])
    acc = torch.tensor([1, 0, 3])           # 0: recovered at depth 2; 1: bonus at 1; 2: bonus at 4
    cu = torch.tensor([0, 2, 2, 5])
    V = 6
    logits, _, _ = _rand_pq(5 + 3, V, seed=7)
    _, q, ids = _rand_pq(5, V, seed=8)
    last = torch.tensor([4, 1, 2])
    got = step_stats(logits, q, ids, cu, acc, last, 0.8)
    # draft rows of request 0 are target rows 0, 1; request 2's are target rows 4, 5, 6
    ref = row_stats(logits[[0, 1, 4, 5, 6]], q, ids, 0.8)
    for k in ref:
        assert torch.allclose(got[k], ref[k], equal_nan=True)
    final_rows = [1, 3, 7]                  # request 0 at depth 2, 1 its bonus row, 2 its bonus row
    p = torch.softmax(logits[final_rows] / 0.8, -1)
    assert torch.allclose(got["entropy_p_last"], -(p * p.log()).sum(-1))
    assert torch.allclose(got["p_emitted"], p[torch.arange(3), last])
    assert torch.isclose(got["q_emitted"][0], q[1, 4].double())       # q of the recovered token, row 1
    assert torch.isnan(got["q_emitted"][1:]).all()                     # bonus tokens
    one_hot = step_stats(logits, None, ids, cu, acc, last, 0.8)
    assert one_hot["q_emitted"][0] == 0 and torch.isnan(one_hot["q_emitted"][1:]).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6])
def test_step_stats_matches_kernel_reference(temperature):
    """Our torch stats and spec_kernels' (the contract the meter reads) agree on a ragged chain batch."""
    from spec_kernels import verify_chain

    nd = torch.tensor([3, 0, 2, 1])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), nd.cumsum(0)])
    N, B, V = int(nd.sum()), 4, 11
    logits, _, _ = _rand_pq(N + B, V, seed=21, scale=2.0)
    _, q, _ = _rand_pq(N, V, seed=22, scale=2.0)
    ids = torch.multinomial(q, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    for qq in (q, None):
        res = verify_chain(logits.float(), cu, ids, None if qq is None else qq.float(),
                           torch.full((B,), temperature), torch.arange(B), torch.zeros(B, dtype=torch.long),
                           backend="torch")
        last = res.emitted.gather(1, res.num_accepted[:, None]).squeeze(1)
        ours = step_stats(logits.float(), qq, ids, cu, res.num_accepted, last, temperature)
        for k, v in res.stats.items():
            assert torch.allclose(ours[k].float(), v, rtol=1e-5, atol=1e-6, equal_nan=True), k


def test_tree_steps_follow_the_accepted_path():
    """Tree verification (spec_kernels reference): the meter reads the committed path's rows."""
    from spec_kernels import verify_tree

    B, T, V = 3, 7, 5
    parents = torch.tensor([[-1, 0, 0, 1, 1, 3, 2], [-1, 0, 1, 2, 3, 4, 5], [-1, 0, 0, 0, 1, 2, 3]])
    g = torch.Generator().manual_seed(5)
    q = torch.softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    logits = q.log() + 0.7 * torch.randn(B, T, V, generator=g)             # p near q: some paths reach a leaf
    par = parents.clamp(min=0)
    tokens = torch.multinomial(q[torch.arange(B)[:, None], par].reshape(-1, V), 1, generator=g).view(B, T)
    p = torch.softmax(logits.double(), -1)
    H = lambda x: -(x * x.log()).sum(-1)                                    # noqa: E731
    seen = set()
    for seed in range(12):
        res = verify_tree(logits, tokens, parents, torch.full((B,), T), q, torch.ones(B), torch.full((B,), seed),
                          torch.zeros(B, dtype=torch.long), backend="torch")
        stats = dict(res.stats, path=res.path, parents=parents)
        m = Meter("cpu", max_steps=2, max_depth=6)
        m.begin(B)
        m.observe(stats, None, res.num_accepted, True)
        committed = [res.emitted[b, : int(res.num_accepted[b]) + 1].tolist() for b in range(B)]
        out = m.flush(committed, [[0]] * B)
        for b in range(B):
            a = int(res.num_accepted[b])
            step = out[b][0]
            for j in range(1, a + 1):                                       # accepted node: its parent's row
                row = int(parents[b, res.path[b, j]])
                assert step["h_verify"][j - 1] == pytest.approx(float(H(p[b, row])), abs=1e-5)
                assert step["h_draft"][j - 1] == pytest.approx(float(H(q[b, row].double())), abs=1e-5)
                assert step["ce_draft"][j - 1] == pytest.approx(-math.log(q[b, row, committed[b][j - 1]]), abs=1e-5)
            n = int(res.path[b, a])                                          # the final token's row
            assert step["h_verify"][a] == pytest.approx(float(H(p[b, n])), abs=1e-5)
            if (parents[b] == n).any():                                      # recovered
                kl = float((p[b, n] * (p[b, n].log() - q[b, n].double().log())).sum())
                assert step["kl"][a] == pytest.approx(kl, abs=1e-5)
                assert step["ce_draft"][a] == pytest.approx(-math.log(q[b, n, committed[b][a]]), abs=1e-5)
                seen.add("recovered")
            else:                                                            # bonus
                assert step["h_draft"][a] is None and step["ce_draft"][a] is None
                seen.add("bonus")
    assert seen == {"recovered", "bonus"}
    m = Meter("cpu", max_steps=2, max_depth=6)
    m.begin(B)
    with pytest.raises(ValueError, match="path"):
        m.observe(dict(res.stats), None, res.num_accepted, True)


# ------------------------------------------------------------------ observe / flush
def _stats(N, B, base, bonus=()):
    """Stats whose values encode (row or request, step) so the mapping can be checked exactly."""
    r = torch.arange(N, dtype=torch.float32)
    b = torch.arange(B, dtype=torch.float32)
    q_emitted = torch.exp(-(base + 9.5 + b))
    q_emitted[list(bonus)] = math.nan
    return {
        "p_draft": torch.full((N,), 0.5), "q_draft": torch.exp(-(base + r + 0.1)), "alpha": 0.01 * r + 0.5,
        "entropy_p": base + r + 0.2, "entropy_q": base + r + 0.3, "kl": base + r + 0.4,
        "entropy_p_last": base + 9.7 + b, "p_emitted": torch.full((B,), 0.5), "q_emitted": q_emitted,
    }


def test_observe_flush_mapping():
    m = Meter("cpu", max_steps=1, max_depth=3)      # grows past max_steps
    m.begin(3)
    # (num_draft, num_accepted, has_q) per step; stats of step s are offset by 20 s
    plan = [([2, 0, 3], [1, 0, 3], True), ([1, 1, 1], [1, 0, 0], False), ([3, 3, 3], [0, 2, 3], True)]
    for s, (nd, acc, has_q) in enumerate(plan):
        nd_t = torch.tensor(nd)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), nd_t.cumsum(0)])
        bonus = [b for b in range(3) if acc[b] == nd[b]]
        m.observe(_stats(int(nd_t.sum()), 3, 20.0 * s, bonus), cu, torch.tensor(acc), has_q)
    # emitted: seq 0: 2 + 2 + 1; seq 1: 1 + 1 + 3, cut to 4 (step 2 truncated); seq 2: 4 + 1 + 4, cut to 5
    committed = [[1, 2, 3, 4, 5], [1, 2, 3, 4], [1, 2, 3, 4, 5]]
    out = m.flush(committed, [[0], [0], [0]])
    assert [len(x) for x in out] == [3, 3, 2]
    assert all(set(step) == set(METER_FIELDS) for seq in out for step in seq)
    s0 = out[0][0]                                   # rows 0, 1: accepted, then recovered at depth 2
    assert s0["h_verify"] == pytest.approx([0.2, 9.7])
    assert s0["h_draft"] == pytest.approx([0.3, 1.3])
    assert s0["ce_draft"] == pytest.approx([0.1, 9.5], rel=1e-5)
    assert s0["kl"] == pytest.approx([0.4, 1.4])
    assert s0["alpha_theory"] == pytest.approx([0.5, 0.51])
    assert s0["tv"] == pytest.approx([0.5, 0.49])
    assert s0["ce_base"] == [None, None] and s0["surplus_ub"] == [None, None]
    s1 = out[1][0]                                   # no drafts: one bonus token
    assert s1["h_verify"] == pytest.approx([10.7])
    assert s1["h_draft"] == [None] and s1["ce_draft"] == [None] and s1["kl"] == [None]
    s2 = out[2][0]                                   # rows 2, 3, 4 accepted, bonus at depth 4
    assert s2["h_verify"] == pytest.approx([2.2, 3.2, 4.2, 11.7])
    assert s2["h_draft"][:3] == pytest.approx([2.3, 3.3, 4.3]) and s2["h_draft"][3] is None
    assert s2["alpha_theory"][:3] == pytest.approx([0.52, 0.53, 0.54]) and s2["alpha_theory"][3] is None
    assert s2["ce_draft"][:3] == pytest.approx([2.1, 3.1, 4.1]) and s2["ce_draft"][3] is None
    no_q = out[0][1]                                 # step 1 has no q: draft side null
    assert no_q["h_verify"] == pytest.approx([20.2, 29.7])
    assert all(no_q[k] == [None, None] for k in ("h_draft", "ce_draft", "kl", "tv", "alpha_theory", "surplus_use"))
    assert out[1][1]["h_verify"] == pytest.approx([30.7])   # recovered at depth 1
    assert out[2][1]["h_verify"] == pytest.approx([31.7])
    assert out[0][2]["h_verify"] == pytest.approx([49.7])   # step 2: recovered at depth 1, row 0
    assert out[0][2]["h_draft"] == pytest.approx([40.3]) and out[0][2]["ce_draft"] == pytest.approx([49.5], rel=1e-5)
    cut = out[1][2]                                  # rows 3, 4 accepted, recovered at depth 3 cut off
    assert cut["h_verify"] == pytest.approx([43.2, 44.2])
    assert cut["h_draft"] == pytest.approx([43.3, 44.3])
    assert cut["ce_draft"] == pytest.approx([43.1, 44.1], rel=1e-5)
    with pytest.raises(ValueError, match="committed ids"):
        m.flush([[1] * 20, [1], [1]], [[0], [0], [0]])


def test_flush_ce_base_is_step_local():
    rng = np.random.default_rng(0)
    base = NgramBase.fit([rng.integers(0, 7, 300).tolist() for _ in range(10)], order=3, vocab_size=7)
    m = Meter("cpu", max_steps=8, max_depth=3, base=base)
    m.begin(1)
    accs = [2, 0, 3, 1]
    for a in accs:
        cu = torch.tensor([0, 3])
        m.observe(_stats(3, 1, 0.0), cu, torch.tensor([a]), True)
    ids = rng.integers(0, 7, sum(a + 1 for a in accs)).tolist()
    ctx = [1, 2, 3]
    out = m.flush([ids], [ctx])[0]
    pos = 0
    for a, step in zip(accs, out):
        window = ids[pos: pos + a + 1]
        for j, tok in enumerate(window):            # depth j + 1 sees only the j tokens before it in the step
            want = -math.log(base.distribution(window[:j], context_len=j)[tok])
            assert step["ce_base"][j] == pytest.approx(want, abs=2e-6)
            assert step["surplus_ub"][j] == pytest.approx(want - step["h_verify"][j], abs=5e-6)
            assert step["surplus_use"][j] == pytest.approx(want - step["ce_draft"][j], abs=5e-6)
        pos += a + 1


def test_disabled_meter_records_nothing():
    m = Meter("cpu", max_steps=4, max_depth=2, enabled=False)
    m.begin(2)
    m.observe({}, torch.tensor([0, 0, 0]), torch.tensor([0, 0]), True)
    assert m.flush([[1], [2]], [[0], [0]]) == [[], []]


def test_build_meter_from_run_config(tmp_path):
    from types import SimpleNamespace

    from harness.config import RunConfig
    from harness.errors import UserError
    from harness.meter.core import build_meter

    target = SimpleNamespace(device=torch.device("cpu"), vocab_size=12)
    cfg = RunConfig(k=3, depth=10, max_new_tokens=20, meter=False)
    m = build_meter(cfg, target)
    assert (m.max_depth, m.enabled, m.base) == (10, False, None)
    NgramBase.fit([[1, 2, 3, 4]], order=2, vocab_size=12).save(tmp_path / "b.safetensors")
    cfg.meter_base = str(tmp_path / "b.safetensors")
    assert build_meter(cfg, target).base.vocab_size == 12
    target.vocab_size = 13
    with pytest.raises(UserError, match="vocabulary"):
        build_meter(cfg, target)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_observe_does_not_sync():
    dev = torch.device("cuda")
    m = Meter(dev, max_steps=4, max_depth=3)
    m.begin(2)
    st = {k: v.to(dev) for k, v in _stats(4, 2, 0.0).items()}
    cu, acc = torch.tensor([0, 1, 4], device=dev), torch.tensor([1, 2], device=dev)
    m.observe(st, cu, acc, True)                    # warm-up (allocations)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):                          # includes a buffer growth
            m.observe(st, cu, acc, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = m.flush([[1, 2] * 7, [1, 2, 3] * 7], [[0], [0]])
    assert len(out[0]) == 7


# ------------------------------------------------------------------ n-gram base
def _reference_kn(seqs, n, V):
    """A plain dict implementation of the same interpolated Kneser-Ney, to check the vectorised one."""
    pad = V
    wins = [tuple([pad] * (n - 1) + s)[i: i + n] for s in seqs for i in range(len(s))]
    raw = {m: Counter(w[n - m:] for w in wins) for m in range(1, n + 1)}
    cont = {m: Counter(g[1:] for g in {w[n - m - 1:] for w in wins}) for m in range(1, n)}

    def disc(table):
        vals = list(table.values())
        n1, n2 = vals.count(1), vals.count(2)
        d = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
        return min(max(d, 0.05), 0.95)

    def prob(m, top, h, w):
        if m == 0:
            return 1.0 / V
        table = raw[m] if top else cont[m]
        lower = prob(m - 1, False, h[1:], w)
        rows = {g: c for g, c in table.items() if g[:-1] == h}
        tot = sum(rows.values())
        if tot == 0:
            return lower
        d = disc(table)
        return max(rows.get(h + (w,), 0) - d, 0) / tot + d * len(rows) / tot * lower

    return prob


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ngram_matches_reference(order):
    rng = np.random.default_rng(order)
    V = 6
    seqs = [rng.choice(5, size=rng.integers(1, 30), p=[0.4, 0.3, 0.15, 0.1, 0.05]).tolist() for _ in range(12)]
    base = NgramBase.fit(seqs, order=order, vocab_size=V)
    prob = _reference_kn(seqs, order, V)
    for ctx in ([], [0], [1, 2], [4, 4, 1], [5, 3]):
        for cap in [None] + list(range(order)):
            for w in range(V):
                got = math.exp(-base.neg_log_prob(ctx, [w], None if cap is None else [cap])[0])
                if cap is None:
                    h = tuple([V] * (order - 1) + ctx)[len(ctx):] if order > 1 else ()
                    want = prob(order, True, h, w)
                else:
                    e = min(cap, len(ctx))
                    want = prob(e + 1, True, tuple(ctx[len(ctx) - e:]), w)
                assert got == pytest.approx(want, rel=1e-10), (ctx, cap, w)


def test_ngram_sums_to_one_and_positive():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 40, rng.integers(5, 80)).tolist() for _ in range(30)]
    for order in (1, 2, 3, 4):
        base = NgramBase.fit(seqs, order=order, vocab_size=50)      # ids 40..49 never seen
        for ctx in ([], [3], seqs[0][:5], [45, 46, 47], [1, 49]):
            for cap in (None, 0, 1, 2, 3):
                d = base.distribution(ctx, context_len=cap)
                assert d.sum() == pytest.approx(1.0, abs=1e-12)
                assert d.min() > 0


def test_ngram_learns_a_bigram_source():
    rng = np.random.default_rng(4)
    V = 5
    T = rng.dirichlet(np.ones(V), size=V)
    cdf = np.cumsum(T, 1)
    seq = [0]
    for u in rng.random(60000):
        seq.append(min(int(np.searchsorted(cdf[seq[-1]], u)), V - 1))
    base = NgramBase.fit([seq], order=2, vocab_size=V)
    for a in range(V):
        np.testing.assert_allclose(base.distribution([a]), T[a], atol=0.015)


def test_ngram_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, 30, rng.integers(5, 60)).tolist() for _ in range(20)]
    base = NgramBase.fit(seqs, order=3, vocab_size=32)
    path = tmp_path / "base.safetensors"
    base.save(path)
    again = NgramBase.load(path)
    assert (again.order, again.vocab_size) == (3, 32)
    ctx, toks = [1, 2], rng.integers(0, 32, 100)
    caps = rng.integers(0, 4, 100)
    np.testing.assert_array_equal(base.neg_log_prob(ctx, toks), again.neg_log_prob(ctx, toks))
    np.testing.assert_array_equal(base.neg_log_prob(ctx, toks, caps), again.neg_log_prob(ctx, toks, caps))
    assert path.stat().st_size < 64 * 1024


def test_fit_base_cli(tmp_path):
    ids = tmp_path / "ids.jsonl"
    lines = [json.dumps({"ids": list(range(i, i + 20))}) for i in range(3)]
    lines.append(json.dumps({"drafter": "ar", "output_ids": [list(range(3, 23)), list(range(4, 24))]}))  # prompts.jsonl
    ids.write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    ngram_base.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "b.safetensors"
    args = parser.parse_args(["fit-base", "--ids", str(ids), "--out", str(out), "--order", "2", "--vocab-size", "64"])
    assert args.func(args) == 0
    base = NgramBase.load(out)
    assert (base.order, base.vocab_size, base.meta["num_tokens"]) == (2, 64, 100)
    bad = parser.parse_args(["fit-base", "--ids", str(ids), "--out", str(out), "--vocab-size", "10"])
    with pytest.raises(ngram_base.UserError, match="vocab-size"):
        bad.func(bad)
