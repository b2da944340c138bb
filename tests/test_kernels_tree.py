"""Tree verification: the Triton kernels (interpreter on CPU) against the float64 reference."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

from spec_kernels import verify_tree
from spec_kernels.checks import check_tree
from spec_kernels.reference import verify_tree_reference
from spec_kernels.testing import fast_interpreter, random_tree

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
