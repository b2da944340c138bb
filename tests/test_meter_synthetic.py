"""The meter against closed forms on synthetic Markov sources, and its statistical identities (CPU).

Source: an order-2 Markov chain over V symbols; the target's p is the true conditional, so the target's
state H_t is the chain's state (the two previous tokens). Closed forms come from the transition tensor
and the stationary distribution (tests/_meter_sim.py). Tolerances: 4 standard errors of the mean plus
0.01 nats for the n-gram base's smoothing and estimation error.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.meter.core import Meter
from harness.meter.ngram_base import NgramBase

from _meter_sim import MarkovSource, bootstrap_mean_ci, flatten, simulate


@pytest.fixture(scope="module")
def source():
    return MarkovSource(V=4, k=2, seed=1, concentration=0.3)


@pytest.fixture(scope="module")
def exact_run(source):
    """Drafter = target (q = p): every draft accepted, steps of exactly K + 1 tokens (fixed segmentation,
    so each depth sees the stationary distribution). Bases of order 2 and 3 fitted on held-out samples."""
    train = source.sample(200, 1000, seed=5)
    bases = {n: NgramBase.fit(train, order=n, vocab_size=source.V) for n in (2, 3)}
    K = 3
    meter = Meter("cpu", max_steps=64, max_depth=K)
    committed, contexts, nds, accs = simulate(source, None, K=K, B=256, steps=100, seed=2, meter=meter, ragged=False)
    assert (accs == K).all()
    out = {}
    for n, base in bases.items():
        meter.base = base
        out[n] = meter.flush(committed, contexts)
    return out


def _close(x: np.ndarray, exact: float, extra: float = 0.01):
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert abs(x.mean() - exact) <= 4 * se + extra, (x.mean(), exact, se)


def _window_sums(records, lo: int = 2) -> np.ndarray:
    """Per step, surplus_ub summed over depths >= lo."""
    return np.array([sum(v for v in step["surplus_ub"][lo - 1:]) for seq in records for step in seq])


def test_per_depth_terms_match_chain_rule(source, exact_run):
    H0, H1, H2 = (source.cond_entropy(m) for m in (0, 1, 2))
    rec = exact_run[3]                                     # trigram base: context covers the state
    _close(flatten(rec, "surplus_ub", 1), H0 - H2)         # I(H_t; W_t): base sees nothing in-step
    _close(flatten(rec, "surplus_ub", 2), H1 - H2)         # I(H_t; W_t+1 | W_t)
    _close(flatten(rec, "surplus_ub", 3), 0.0)             # W_t, W_t+1 determine the state
    _close(flatten(rec, "surplus_ub", 4), 0.0)
    assert H1 - H2 > 0.05                                  # the source has a surplus to find


def test_window_sum_matches_paper_surplus(source, exact_run):
    exact = source.window_surplus(4)                       # I(H_t; W_t+1..W_t+3 | W_t) by enumeration
    _close(_window_sums(exact_run[3]), exact)
    # a bigram base conditions on less than the window: the estimate is from above, K (= 3) x I(W_t-1; W_t+1 | W_t)
    bigram = _window_sums(exact_run[2])
    _close(bigram, 3 * (source.cond_entropy(1) - source.cond_entropy(2)))
    assert bigram.mean() > exact + 0.1


def test_target_only_steps(source):
    """ar-like steps (K = 0, every token a bonus) and a one-hot drafter: target side only."""
    base = NgramBase.fit(source.sample(100, 1000, seed=6), order=3, vocab_size=source.V)
    meter = Meter("cpu", max_steps=64, max_depth=0, base=base)
    committed, contexts, _, _ = simulate(source, None, K=0, B=128, steps=80, seed=3, meter=meter)
    rec = meter.flush(committed, contexts)
    assert all(len(step["h_verify"]) == 1 for seq in rec for step in seq)
    _close(flatten(rec, "surplus_ub"), source.cond_entropy(0) - source.cond_entropy(2))
    table = np.full((source.V, source.V), 1.0 / source.V)
    meter = Meter("cpu", max_steps=16, max_depth=2, base=base)
    committed, contexts, _, _ = simulate(source, table + np.eye(source.V), K=2, B=8, steps=10, seed=4,
                                         meter=meter, one_hot=True)
    for seq in meter.flush(committed, contexts):
        for step in seq:
            assert None not in step["h_verify"] and None not in step["surplus_ub"]
            assert all(step[k] == [None] * len(step["h_verify"])
                       for k in ("h_draft", "ce_draft", "kl", "tv", "alpha_theory", "surplus_use"))


@pytest.fixture(scope="module")
def sampled_run():
    """A drafter with its own (wrong) order-1 q, ragged draft lengths, speculative sampling at T = 1."""
    src = MarkovSource(V=6, k=2, seed=3, concentration=0.5)
    q_table = np.random.default_rng(0).dirichlet(np.ones(6), size=6)
    K = 4
    meter = Meter("cpu", max_steps=64, max_depth=K)
    committed, contexts, nds, accs = simulate(src, q_table, K=K, B=256, steps=80, seed=2, meter=meter)
    return meter.flush(committed, contexts), nds, accs, K


def test_cross_entropy_minus_entropy_is_kl(sampled_run):
    """Committed tokens are drawn from p, so E[ce_draft - h_verify] = E[KL(p || q)] (per token)."""
    rec = sampled_run[0]
    d = np.array([cd - hv - kl for seq in rec for step in seq
                  for hv, cd, kl in zip(step["h_verify"], step["ce_draft"], step["kl"]) if kl is not None])
    assert len(d) > 20000
    _close(d, 0.0, extra=0.0)


def test_alpha_theory_is_calibrated(sampled_run):
    """Mean alpha_theory at depth j = observed acceptance of draft j among steps that drafted j tokens and
    accepted j - 1 (99% bootstrap interval of the paired difference contains 0)."""
    rec, nds, accs, K = sampled_run
    for j in range(1, K + 1):
        diffs = np.array([float(accs[s, b] >= j) - step["alpha_theory"][j - 1]
                          for b, seq in enumerate(rec) for s, step in enumerate(seq)
                          if nds[s, b] >= j and accs[s, b] >= j - 1])
        lo, hi = bootstrap_mean_ci(diffs, level=0.99, seed=j)
        assert lo <= 0.0 <= hi, (j, diffs.mean(), lo, hi)
        if j == 1:
            assert hi - lo < 0.03                          # sharp enough to catch a few percent of error
