"""Statistical tests: speculative sampling is lossless, acceptance follows sum min(p, q), and the
statistics equal a direct float64 computation.

Each test puts many requests (same distributions, different seeds) in one call. On the CPU they run
the float64 reference (the kernels agree with it token for token, see test_kernels_chain/tree.py);
on a GPU machine `pytest -m gpu` runs the same tests on the Triton kernels. Significance: 1e-4,
Bonferroni-corrected over the positions / cells a test checks. Seeds are fixed, so runs are
reproducible.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from scipy import stats as sps

from spec_kernels import verify_chain, verify_tree

ALPHA = 1e-4
GPU = pytest.param("triton", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")])
BACKENDS = ["torch", GPU]


def device(backend):
    return "cuda" if backend == "triton" else "cpu"


def assert_distribution(tokens, p, alpha, what):
    """Chi-square goodness of fit of integer samples to p; categories with p = 0 must never appear."""
    tokens = tokens.cpu()
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    zero = p <= 0
    assert counts[zero].sum() == 0, f"{what}: a zero-probability token was emitted"
    expected = p[~zero] / p[~zero].sum() * counts.sum()
    assert expected.min() >= 5, f"{what}: too few samples for a chi-square test"
    pval = sps.chisquare(counts[~zero].numpy(), expected.numpy()).pvalue
    assert pval > alpha, f"{what}: p-value {pval:.2e}, counts {counts.tolist()}, expected {(p * counts.sum()).tolist()}"


def chain_batch(B, row_logits, drafts, q, temperature, seed0=0, positions=None):
    """B requests of K drafts each; row_logits [B, K+1, V], drafts [B, K], q [B, K, V] or None."""
    K, V = drafts.shape[1], row_logits.shape[-1]
    dev = row_logits.device
    cu = torch.arange(B + 1, device=dev) * K
    return (row_logits.reshape(B * (K + 1), V), cu, drafts.reshape(-1),
            q.reshape(B * K, V) if q is not None else None, torch.full((B,), temperature, device=dev),
            torch.arange(B, device=dev) + seed0,
            positions if positions is not None else torch.zeros(B, dtype=torch.int64, device=dev))


def logits_table(shape, gen, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64).float() * scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_q", [False, True])
def test_chain_position_marginals(backend, with_q):
    """Context-free targets p_j: the token emitted at position j (when there is one) follows p_j."""
    B, K, V, temp = 20_000, 3, 6, 0.8
    gen = torch.Generator().manual_seed(1)
    L = logits_table((K + 1, V), gen, 0.8)
    L[1, 4] = float("-inf")  # a zero-probability token at position 1
    q = torch.softmax(L[:K] / temp + logits_table((K, V), gen, 0.7), -1)  # close to p: drafts get accepted
    # Drafts are drawn from q; a one-hot drafter (q = onehot(x)) is lossless whatever x is.
    drafts = torch.stack([torch.multinomial(q[j], B, replacement=True, generator=gen) for j in range(K)], 1)
    dev = device(backend)
    args = chain_batch(B, L.expand(B, K + 1, V).to(dev), drafts.to(dev),
                       q.expand(B, K, V).to(dev) if with_q else None, temp)
    res = verify_chain(*args, backend=backend)
    p = torch.softmax(L.double() / temp, -1)
    emitted = res.emitted.cpu()
    assert not res.error.any()
    for j in range(K + 1):
        have = emitted[:, j] >= 0
        assert_distribution(emitted[have, j], p[j], ALPHA / (K + 1), f"position {j}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_joint_of_two_tokens(backend):
    """Context-dependent targets: the first two emitted tokens follow p0(a) p1(b | a), taking a second
    verification step (one draft, positions moved on) when the first step emitted only one token."""
    B, V, temp = 30_000, 5, 1.0
    gen = torch.Generator().manual_seed(2)
    dev = device(backend)
    L0 = logits_table((V,), gen, 1.2)
    L1 = logits_table((V, V), gen, 1.2)  # row of the token after a
    L2 = logits_table((V, V, V), gen, 1.2)  # bonus row after (a, b)
    q0 = torch.softmax(logits_table((V,), gen), -1)
    q1 = torch.softmax(logits_table((V, V), gen), -1)  # drafter's next-token q given a
    x0 = torch.multinomial(q0, B, replacement=True, generator=gen)
    x1 = torch.multinomial(q1[x0], 1, generator=gen)[:, 0]
    rows = torch.stack([L0.expand(B, V), L1[x0], L2[x0, x1]], 1)  # [B, 3, V]
    qs = torch.stack([q0.expand(B, V), q1[x0]], 1)
    args = chain_batch(B, rows.to(dev), torch.stack([x0, x1], 1).to(dev), qs.to(dev), temp, seed0=7)
    first = verify_chain(*args, backend=backend).emitted.cpu()
    a, b = first[:, 0], first[:, 1].clone()
    short = b < 0
    # Second step for requests that emitted one token: draft y ~ q1(. | a) judged by L1[a].
    n = int(short.sum())
    y = torch.multinomial(q1[a[short]], 1, generator=gen)[:, 0]
    rows2 = torch.stack([L1[a[short]], L2[a[short], y]], 1)
    seeds = (torch.arange(B) + 7)[short]
    args2 = chain_batch(n, rows2.to(dev), y[:, None].to(dev), q1[a[short]][:, None].to(dev), temp,
                        positions=torch.ones(n, dtype=torch.int64, device=dev))
    args2 = args2[:5] + (seeds.to(dev),) + args2[6:]
    b[short] = verify_chain(*args2, backend=backend).emitted.cpu()[:, 0]
    joint = torch.softmax(L0.double() / temp, -1)[:, None] * torch.softmax(L1.double() / temp, -1)
    assert_distribution(a * V + b, joint.reshape(-1), ALPHA, "joint of two tokens")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_q", [False, True])
def test_acceptance_rate_is_sum_min_p_q(backend, with_q):
    B, V, temp = 20_000, 8, 1.3
    gen = torch.Generator().manual_seed(3)
    L = logits_table((2, V), gen, 1.5)
    p0 = torch.softmax(L[0].double() / temp, -1)
    if with_q:
        q = torch.softmax(logits_table((V,), gen, 1.5), -1)
        drafts = torch.multinomial(q, B, replacement=True, generator=gen)
        rate = float(torch.minimum(p0, q.double()).sum())
        qb = q.expand(B, 1, V).to(device(backend))
    else:
        drafts = torch.full((B,), int(p0.argmax()), dtype=torch.int64)
        rate = float(p0.max())
        qb = None
    args = chain_batch(B, L.expand(B, 2, V).to(device(backend)), drafts[:, None].to(device(backend)), qb, temp)
    res = verify_chain(*args, backend=backend)
    accepted = int(res.num_accepted.sum())
    assert sps.binomtest(accepted, B, rate).pvalue > ALPHA
    torch.testing.assert_close(res.stats["alpha"].double().mean().cpu(), torch.tensor(rate, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_probability_tokens_never_emitted_or_accepted(backend):
    B, K, V = 5_000, 2, 7
    gen = torch.Generator().manual_seed(4)
    L = logits_table((K + 1, V), gen)
    L[:, :2] = float("-inf")  # tokens 0 and 1 have p = 0
    q = torch.zeros(K, V)
    q[:, :2] = 0.45
    q[:, 2:] = 0.1 / (V - 2)  # the drafter prefers the forbidden tokens
    drafts = torch.stack([torch.multinomial(q[j], B, replacement=True, generator=gen) for j in range(K)], 1)
    dev = device(backend)
    res = verify_chain(*chain_batch(B, L.expand(B, K + 1, V).to(dev), drafts.to(dev), q.expand(B, K, V).to(dev), 1.0),
                       backend=backend)
    emitted = res.emitted.cpu()
    assert not bool(((emitted == 0) | (emitted == 1)).any())
    first_bad = drafts[:, 0] < 2
    assert bool((res.num_accepted.cpu()[first_bad] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_q", [False, True])
def test_tree_first_and_second_token(backend, with_q):
    """Root with three children (drawn from q without replacement, or three distinct one-hot drafts),
    each with two children: the first emitted token follows p(root); after accepting child c the next
    one follows p(row c)."""
    B, V, temp = 20_000, 6, 1.0
    gen = torch.Generator().manual_seed(5 + with_q)
    T = 10
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    L = logits_table((T, V), gen, 1.3)
    q = torch.softmax(logits_table((T, V), gen, 1.3), -1)
    tokens = torch.zeros((B, T), dtype=torch.int64)
    for parent, kids in ((0, [1, 2, 3]), (1, [4, 5]), (2, [6, 7]), (3, [8, 9])):
        if with_q:  # siblings drawn from q without replacement, as the rule's q' assumes
            tokens[:, kids] = torch.multinomial(q[parent].expand(B, V), len(kids), replacement=False, generator=gen)
        else:
            tokens[:, kids] = torch.tensor(kids) % V  # distinct one-hot drafts
    dev = device(backend)
    res = verify_tree(L.expand(B, T, V).to(dev), tokens.to(dev), parents.expand(B, T).to(dev),
                      torch.full((B,), T, device=dev), q.expand(B, T, V).to(dev) if with_q else None,
                      torch.full((B,), temp, device=dev), torch.arange(B, device=dev) + 100,
                      torch.full((B,), 50, device=dev), backend=backend)
    p = torch.softmax(L.double() / temp, -1)
    emitted, path = res.emitted.cpu(), res.path.cpu()
    checks = [(torch.ones(B, dtype=torch.bool), 0, 0)] + [(path[:, 1] == c, 1, c) for c in (1, 2, 3)]
    checks = [(sel, pos, node) for sel, pos, node in checks if int(sel.sum()) * float(p[node].min()) >= 5]
    assert len(checks) >= 2
    for sel, pos, node in checks:
        assert_distribution(emitted[sel, pos], p[node], ALPHA / len(checks), f"tree node {node}")


def test_stats_identities_and_direct_computation():
    gen = torch.Generator().manual_seed(6)
    B, K, V, temp = 3, 2, 11, 0.7
    L = logits_table((B, K + 1, V), gen, 2.0)
    q = torch.softmax(logits_table((B, K, V), gen), -1)
    drafts = torch.randint(0, V, (B, K), generator=gen)
    res = verify_chain(*chain_batch(B, L, drafts, q, temp), backend="torch")
    p = torch.softmax(L[:, :K].double() / temp, -1).reshape(B * K, V)
    qq = q.double().reshape(B * K, V)
    x = drafts.reshape(-1)
    rows = torch.arange(B * K)
    tv = 0.5 * (p - qq).abs().sum(-1)
    want = {
        "alpha": 1 - tv,
        "p_draft": p[rows, x],
        "q_draft": qq[rows, x],
        "entropy_p": -(p * p.log()).sum(-1),
        "entropy_q": -(qq * qq.log()).sum(-1),
        "kl": (p * (p.log() - qq.log())).sum(-1),
    }
    for k, v in want.items():
        torch.testing.assert_close(res.stats[k].double(), v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # one-hot drafter: alpha = p(x), q = 1, H(q) = 0, KL undefined (NaN)
    res1 = verify_chain(*chain_batch(B, L, drafts, None, temp), backend="torch")
    torch.testing.assert_close(res1.stats["alpha"].double(), p[rows, x], rtol=1e-5, atol=1e-7)
    assert bool((res1.stats["q_draft"] == 1).all() and (res1.stats["entropy_q"] == 0).all())
    assert bool(res1.stats["kl"].isnan().all())
    # per request: the row that gave the final token
    final = torch.arange(B) * (K + 1) + res.num_accepted
    pf = torch.softmax(L.reshape(B * (K + 1), V).double() / temp, -1)[final]
    tok = res.emitted[torch.arange(B), res.num_accepted]
    torch.testing.assert_close(res.stats["entropy_p_last"].double(), -(pf * pf.log()).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.stats["p_emitted"].double(), pf[torch.arange(B), tok], rtol=1e-5, atol=1e-7)


def test_greedy_stats_use_unit_temperature():
    gen = torch.Generator().manual_seed(8)
    L = logits_table((1, 2, 9), gen, 2.0)
    drafts = L[0, :1].argmax(-1, keepdim=True)
    res = verify_chain(*chain_batch(1, L, drafts, None, 0.0), backend="torch")
    p = torch.softmax(L[0].double(), -1)
    assert res.emitted[0].tolist() == [int(drafts[0, 0]), int(L[0, 1].argmax())]
    torch.testing.assert_close(res.stats["p_draft"].double(), p[0, drafts[0]], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.stats["p_emitted"].double(), p[1].max()[None], rtol=1e-6, atol=1e-7)
