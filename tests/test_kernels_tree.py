"""Tree verification: the Triton kernels (interpreter on CPU) against the float64 reference."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

from spec_kernels import verify_tree
from spec_kernels.checks import check_tree
from spec_kernels.reference import verify_tree_reference
from spec_kernels.testing import PEAKED_P, PEAKED_Q_LOGITS, TreeProblem, fast_interpreter, random_tree

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(DEV == "cpu" and not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1")


def exact(test):
    """Triton against the float64 reference, token for token: runs on the CPU (interpreter) in every run
    and on CUDA when selected with `pytest -m gpu` (marks gpu and exact; no CUDA skip)."""
    return pytest.mark.gpu(pytest.mark.exact(needs_triton(test)))
# The interpreter evaluates masked lanes too (log 0, inf - inf): numpy warns, results are unaffected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def _fast_interpreter():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster and kinder to a shared machine
    with fast_interpreter():
        yield
    torch.set_num_threads(threads)


def run_triton(problem, block_v=None, chunks=None, uniforms=None, noise=None):
    from spec_kernels.tree import verify_tree_triton

    args = [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in problem.args()]
    return verify_tree_triton(check_tree(*args, uniforms, noise), block_v=block_v, chunks=chunks)


def run_reference(problem, uniforms=None, noise=None):
    return verify_tree_reference(check_tree(*problem.args(), uniforms, noise))


def assert_same(got, want, atol=2e-5, rtol=2e-4):
    for name in ("error", "num_accepted", "path", "emitted"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name
    assert set(got.stats) == set(want.stats)
    for k, v in want.stats.items():
        g = got.stats[k].cpu()
        assert g.dtype == torch.float32 and g.shape == v.shape, k
        torch.testing.assert_close(g, v, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{k}: {m}")


@exact
@pytest.mark.parametrize("with_q", [False, True])
@pytest.mark.parametrize("temps", ["greedy", "sample", "mixed"])
def test_matches_reference_multi_chunk(with_q, temps):
    t = {"greedy": 0.0, "sample": 1.0, "mixed": [0.0, 0.6, 1.0, 1.7, 1.0, 0.0]}[temps]
    p = random_tree(6, 7, 37, with_q=with_q, temperature=t, gen=torch.Generator().manual_seed(len(temps) + with_q))
    want = run_reference(p)
    assert_same(run_triton(p, block_v=16, chunks=2), want)


@exact
@pytest.mark.parametrize("with_q", [False, True])
def test_wide_trees_many_rejections(with_q):
    """A root with five children (duplicates included): the recursive residual is used several times."""
    B, T, V = 4, 7, 23
    p = random_tree(B, T, V, with_q=with_q, temperature=1.0, accept_bias=0.0, scale=1.0,
                    gen=torch.Generator().manual_seed(21))
    p.parents[:] = torch.tensor([-1, 0, 0, 0, 0, 0, 1])
    p.num_nodes[:] = T
    p.tokens[:, 2] = p.tokens[:, 1]  # a duplicated sibling
    want = run_reference(p)
    assert (want.num_accepted == 0).any() and (want.emitted >= 0).sum(1).min() >= 1
    assert_same(run_triton(p, block_v=16, chunks=2), want)


@exact
@pytest.mark.parametrize("with_q", [False, True])
def test_injected_randomness_bitwise(with_q):
    B, T, V = 4, 6, 29
    p = random_tree(B, T, V, with_q=with_q, temperature=[1.0, 0.8, 1.0, 1.5], gen=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    uniforms = torch.rand((B, T), generator=g)
    noise = -torch.log(-torch.log(torch.rand((B, T, V), generator=g).clamp(1e-7, 1 - 1e-7)))
    want = run_reference(p, uniforms, noise)
    assert_same(run_triton(p, uniforms=uniforms.to(DEV), noise=noise.to(DEV)), want)


@exact
@pytest.mark.parametrize("vocab", [2, 8193])
def test_vocab_sizes(vocab):
    p = random_tree(3, 5, vocab, with_q=vocab < 100, temperature=[1.0, 0.0, 0.7],
                    gen=torch.Generator().manual_seed(vocab))
    res = verify_tree(*[a.to(DEV) if a is not None else None for a in p.args()], backend="triton")
    assert_same(res, run_reference(p), atol=1e-4, rtol=1e-3)


@exact
def test_greedy_walk_and_bonus():
    """Greedy: follow the first child that is the argmax; a leaf gives its argmax as the bonus token."""
    V = 10
    p = random_tree(1, 5, V, temperature=0.0)
    p.parents[0] = torch.tensor([-1, 0, 0, 2, 2])
    best = p.logits[0].argmax(-1)
    p.tokens[0] = torch.tensor([0, (best[0] + 1) % V, best[0], (best[2] + 1) % V, best[2]])
    p.num_nodes[:] = 5
    want = run_reference(p)
    assert want.path[0].tolist() == [0, 2, 4]
    assert want.emitted[0].tolist() == [int(best[0]), int(best[2]), int(best[4])]
    assert want.stats["q_emitted"][0].isnan()  # bonus token
    assert_same(run_triton(p), want)


@exact
def test_errors_root_only_and_padding():
    p = random_tree(4, 5, 16, with_q=True, temperature=1.0, gen=torch.Generator().manual_seed(6))
    p.num_nodes[:] = torch.tensor([5, 1, 3, 5])
    p.logits[2, 1, 3] = float("nan")
    p.logits[1, 3, 0] = float("nan")  # padding node of request 1: ignored
    want = run_reference(p)
    assert want.error.tolist() == [False, False, True, False]
    assert want.emitted[1, 0] >= 0 and want.path[1].tolist()[0] == 0
    assert want.emitted[2].eq(-1).all()
    assert_same(run_triton(p), want)


@needs_triton
def test_batch_permutation():
    p = random_tree(5, 6, 30, temperature=1.0, gen=torch.Generator().manual_seed(9))
    a = run_triton(p)
    perm = [2, 4, 0, 1, 3]
    for name in ("logits", "tokens", "parents", "num_nodes", "temperature", "seeds", "positions"):
        setattr(p, name, getattr(p, name)[perm])
    b = run_triton(p)
    a_path = a.path.cpu()[perm]
    width = b.path.shape[1]  # Dmax of the permuted batch is the same
    assert torch.equal(b.path.cpu(), a_path[:, :width])
    assert torch.equal(b.emitted.cpu(), a.emitted.cpu()[perm][:, :width])
    torch.testing.assert_close(b.stats["p_draft"].cpu(), a.stats["p_draft"].cpu()[perm], equal_nan=True)


def test_input_errors():
    p = random_tree(2, 4, 10)
    args = list(p.args())
    bad_parents = p.parents.clone()
    bad_parents[0, 2] = 2
    with pytest.raises(ValueError, match="parents\\[n\\] < n"):
        verify_tree(args[0], args[1], bad_parents, *args[3:], backend="torch")
    with pytest.raises(ValueError, match="num_nodes must lie in"):
        verify_tree(*args[:3], torch.tensor([0, 4]), *args[4:], backend="torch")
    with pytest.raises(ValueError, match="tokens must have shape"):
        verify_tree(args[0], args[1][:, :3], *args[2:], backend="torch")


def siblings_by_hand(p, q, xs):
    """The multi-draft rule on one root, written out in float64: siblings xs tried in order, all rejected.

    p [V], q [V] or None (one-hot). Returns each sibling's accept threshold r(x) / q'(x) (inf: q'(x) = 0,
    never accepted) and the residual after the last rejection. q' = q without the earlier siblings'
    tokens, divided by its sum over the tokens not yet drawn.
    """
    r, drawn, thetas = p.clone(), [], []
    for x in xs:
        if q is None:
            qp = torch.nn.functional.one_hot(torch.tensor(x), p.numel()).double()
        else:
            undrawn = q.clone()
            undrawn[drawn] = 0.0
            qp = undrawn / undrawn.sum() if undrawn.sum() > 0 else undrawn
        thetas.append(float(r[x] / qp[x]) if qp[x] > 0 else float("inf"))
        w = (r - qp).clamp(min=0)
        r = w / w.sum() if w.sum() > 0 else p.clone()
        drawn.append(x)
    return thetas, r


def tree_threshold_problem(with_q: bool, eps: float):
    """One root with up to three children per request; the accept uniforms sit just either side of each
    sibling's threshold, so request `accept at k` rejects siblings < k (u = theta (1 + eps)) and accepts
    sibling k (u = theta (1 - eps)); k = -1 rejects every sibling and draws from the final residual.
    With q: the peaked-q repro (q[0] == 1.0 in float32), a moderate random q, and a first sibling with
    q(x) = 0 < p(x) (q'(x) = 0 must reject it whatever u). The root row's noise has +30 at the siblings'
    tokens (a residual that kept a rejected sibling would emit it). Returns the problem, uniforms, noise,
    and the hand-computed path[:, 1] and emitted [B, 2]."""
    V, T = 6, 4
    gen = torch.Generator().manual_seed(41)
    peaked_p = torch.tensor(PEAKED_P, dtype=torch.float64)
    peaked_q = torch.softmax(torch.tensor(PEAKED_Q_LOGITS), -1)
    moderate_p = torch.tensor([0.11, 0.17, 0.31, 0.22, 0.13, 0.06], dtype=torch.float64)
    moderate_q = torch.tensor([0.08, 0.32, 0.11, 0.13, 0.10, 0.26])  # thresholds 0.53, 0.58, 0.62 for 1, 4, 3
    zero_q = moderate_q.clone()
    zero_q[4] = 0.0
    zero_q = zero_q / zero_q.sum()
    if with_q:
        families = [(peaked_p, peaked_q, [0, 1, 2], [0, 1, 2, -1]), (moderate_p, moderate_q, [1, 4, 3], [0, 1, 2, -1]),
                    (moderate_p, zero_q, [4, 0], [1, -1])]
    else:
        families = [(peaked_p, None, [0, 1, 2], [0, 1, 2, -1]), (moderate_p, None, [3, 1, 5], [0, 1, 2, -1])]
    cases = [(fam[:3], k) for fam in families for k in fam[3]]  # k: the sibling to accept (-1: none)
    B = len(cases)
    logits = torch.randn((B, T, V), generator=gen)
    tokens = torch.zeros((B, T), dtype=torch.int64)
    parents = torch.full((B, T), -1, dtype=torch.int64)
    num_nodes = torch.zeros(B, dtype=torch.int64)
    q_all = torch.zeros((B, T, V)) if with_q else None
    u = torch.full((B, T), 0.5)
    noise = -torch.log(-torch.log(torch.rand((B, T, V), generator=gen, dtype=torch.float64)))
    want_path = torch.zeros(B, dtype=torch.int64)
    want_emitted = torch.full((B, 2), -1, dtype=torch.int64)
    for b, ((p, q, xs), k) in enumerate(cases):
        logits[b, 0] = p.log().float()
        p = torch.softmax(logits[b, 0].double(), -1)  # what the kernels see
        qd = q.double() if q is not None else None
        thetas, r_final = siblings_by_hand(p, qd, xs)
        n = len(xs)
        tokens[b, 1:n + 1] = torch.tensor(xs)
        parents[b, 1:n + 1] = 0
        num_nodes[b] = n + 1
        if with_q:
            q_all[b, 0] = q
        noise[b, 0, xs] += 30.0
        last = n - 1 if k < 0 else k
        for i in range(last + 1):
            theta = thetas[i]
            if theta == float("inf"):
                assert i != k
                u[b, i + 1] = 1e-6  # tiny u: only the q'(x) = 0 rule rejects it
            else:
                assert theta < 0.95, (b, i, theta)  # both sides of the threshold lie in (0, 1)
                u[b, i + 1] = theta * (1 - eps) if i == k else theta * (1 + eps)
        if k >= 0:
            want_path[b] = k + 1
            child = torch.softmax(logits[b, k + 1].double(), -1)
            want_emitted[b] = torch.tensor([xs[k], int((child.log() + noise[b, k + 1]).argmax())])
        else:
            want_path[b] = -1
            want_emitted[b, 0] = int((r_final.log() + noise[b, 0]).argmax())
    prob = TreeProblem(logits, tokens, parents, num_nodes, q_all, torch.ones(B), torch.arange(B),
                       torch.zeros(B, dtype=torch.int64))
    return prob, u, noise.float(), want_path, want_emitted


@exact
@pytest.mark.parametrize("with_q", [False, True])
def test_sibling_thresholds_and_final_residual_exact(with_q):
    """Each sibling is accepted just below r(x) / q'(x) and rejected just above it (eps = 1e-3 relative),
    with q' normalised by the q mass of the tokens not yet drawn (peaked q included); q'(x) = 0 rejects;
    after every sibling is rejected the token is the Gumbel-max of the final residual. Both backends,
    against a hand computation."""
    prob, u, noise, want_path, want_emitted = tree_threshold_problem(with_q, eps=1e-3)
    want = run_reference(prob, u, noise)
    assert want.path[:, 1].tolist() == want_path.tolist()
    assert want.emitted[:, :2].tolist() == want_emitted.tolist()
    got = run_triton(prob, block_v=16, chunks=1, uniforms=u.to(DEV), noise=noise.to(DEV))
    assert got.path[:, 1].cpu().tolist() == want_path.tolist()
    assert got.emitted[:, :2].cpu().tolist() == want_emitted.tolist()
    assert_same(got, want)
