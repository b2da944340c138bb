"""Chain verification: the Triton kernels (interpreter on CPU) against the float64 reference.

Tokens must agree exactly (same counter-based randomness), statistics to float32 accuracy. Sizes are
small because the interpreter costs ~0.1 s per request; the statistical tests (test_kernels_stats.py)
validate the reference with many samples, and the agreement here carries them over to the kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import triton
import triton.language as tl

from spec_kernels import verify_chain
from spec_kernels import rng
from spec_kernels.checks import check_chain
from spec_kernels.reference import verify_chain_reference
from spec_kernels.testing import fast_interpreter, random_chain
from spec_kernels.triton_rng import row_key, token_uniform

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
    from spec_kernels.chain import verify_chain_triton

    args = [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in problem.args()]
    inp = check_chain(*args, uniforms, noise)
    return verify_chain_triton(inp, block_v=block_v, chunks=chunks)


def run_reference(problem, uniforms=None, noise=None):
    return verify_chain_reference(check_chain(*problem.args(), uniforms, noise))


def assert_same(got, want, atol=2e-5, rtol=2e-4):
    assert torch.equal(got.error.cpu(), want.error)
    assert torch.equal(got.num_accepted.cpu(), want.num_accepted)
    assert torch.equal(got.emitted.cpu(), want.emitted)
    assert set(got.stats) == set(want.stats)
    for k, v in want.stats.items():
        g = got.stats[k].cpu()
        assert g.dtype == torch.float32 and g.shape == v.shape, k
        torch.testing.assert_close(g, v, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{k}: {m}")


@triton.jit
def uniforms_kernel(seed_ptr, pos_ptr, out_ptr, V, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    key = row_key(tl.load(seed_ptr + b), tl.load(pos_ptr + b), 1)
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + b * V + offs, token_uniform(key, offs), mask=offs < V)


@exact
def test_rng_bits_match_reference():
    seeds = torch.tensor([0, 1, -1, 2**40 + 7, -(2**62), 123456789012345, 2**63 - 1])
    pos = torch.tensor([0, 5, 2**33 + 1, -3, 17, 99, 2**62])
    V = 3000
    out = torch.empty((len(seeds), V), dtype=torch.float32, device=DEV)
    uniforms_kernel[(len(seeds),)](seeds.to(DEV), pos.to(DEV), out, V, BLOCK=4096)
    want = rng.uniform(seeds[:, None], pos[:, None], torch.arange(V)[None, :], rng.STREAM_DRAW)
    assert torch.equal(out.cpu().double(), want)
    assert 0 < float(want.min()) and float(want.max()) < 1


@exact
@pytest.mark.parametrize("with_q", [False, True])
@pytest.mark.parametrize("temps", ["greedy", "sample", "mixed"])
def test_matches_reference_multi_chunk(with_q, temps):
    """Ragged batch (K_b = 0 included), odd V, several tiles and chunks per row."""
    counts = [3, 0, 2, 4, 1, 3]
    t = {"greedy": 0.0, "sample": 1.0, "mixed": [0.0, 0.7, 1.0, 2.0, 0.0, 1.3]}[temps]
    p = random_chain(counts, 37, with_q=with_q, temperature=t, gen=torch.Generator().manual_seed(len(temps)))
    want = run_reference(p)
    assert_same(run_triton(p, block_v=16, chunks=2), want)
    if temps == "sample":  # the draws must exercise accepted drafts, recoveries and bonus tokens
        assert want.num_accepted.min() == 0 and (want.num_accepted == torch.tensor(counts)).any()


@exact
@pytest.mark.parametrize("with_q", [False, True])
def test_injected_randomness_bitwise(with_q):
    p = random_chain([2, 3, 0, 1], 29, with_q=with_q, temperature=[1.0, 0.8, 1.0, 1.5],
                     gen=torch.Generator().manual_seed(3))
    N, R = p.draft_ids.numel(), p.logits.shape[0]
    g = torch.Generator().manual_seed(4)
    uniforms = torch.rand(N, generator=g)
    noise = -torch.log(-torch.log(torch.rand((R, 29), generator=g).clamp(1e-7, 1 - 1e-7)))
    want = run_reference(p, uniforms, noise)
    got = run_triton(p, block_v=16, chunks=2, uniforms=uniforms.to(DEV), noise=noise.to(DEV))
    assert_same(got, want)
    internal = run_reference(p)
    assert not torch.equal(internal.emitted, want.emitted)  # the injection is really used


@exact
@pytest.mark.parametrize("vocab", [2, 100, 8193, 49152])
def test_vocab_sizes(vocab):
    counts = [2, 1, 0] if vocab > 10_000 else [2, 1, 0, 3]
    temps = [1.0, 0.0, 1.0] if vocab > 10_000 else [1.0, 0.0, 1.0, 0.6]
    p = random_chain(counts, vocab, with_q=vocab <= 10_000, temperature=temps,
                     gen=torch.Generator().manual_seed(vocab))
    tol = dict(atol=2e-4, rtol=1e-3) if vocab > 10_000 else {}
    assert_same(verify_chain(*[a.to(DEV) if a is not None else None for a in p.args()], backend="triton"),
                run_reference(p), **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("with_q", [False, True])
def test_vocab_262144_gpu(with_q):
    p = random_chain([4, 2, 0, 3], 262_144, with_q=with_q, temperature=[1.0, 0.0, 1.0, 0.7])
    assert_same(run_triton(p), run_reference(p), atol=2e-4, rtol=1e-3)


def test_vocab_262144_reference_runs():
    p = random_chain([2, 0], 262_144, temperature=[1.0, 0.0])
    res = verify_chain(*p.args(), backend="torch")
    assert res.emitted.shape == (2, 3) and bool((res.emitted[:, 0] >= 0).all())


@exact
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    p = random_chain([2, 3, 1], 300, temperature=[1.0, 0.0, 0.9], dtype=dtype, gen=torch.Generator().manual_seed(7))
    assert_same(run_triton(p), run_reference(p))


@exact
def test_zero_q_and_zero_p_drafts():
    """q(x) = 0: accept iff p(x) > 0. A token with p = 0 (logit -inf) is never accepted nor emitted."""
    V = 12
    p = random_chain([2, 2], V, with_q=True, temperature=1.0, gen=torch.Generator().manual_seed(11))
    p.logits[:, 5] = float("-inf")  # token 5 has p = 0 everywhere
    p.draft_ids[:] = torch.tensor([3, 4, 5, 1])
    q = p.draft_probs
    q[0, 3] = 0.0  # p(3) > 0, q(3) = 0: must be accepted
    q[2, 5] = 0.5  # p(5) = 0: must be rejected
    p.draft_probs = q / q.sum(-1, keepdim=True)
    want = run_reference(p)
    assert int(want.num_accepted[1]) == 0 and int(want.num_accepted[0]) >= 1
    assert not bool((want.emitted == 5).any())
    assert_same(run_triton(p), want)


@exact
def test_all_accepted_none_accepted_and_empty():
    V = 50
    p = random_chain([3, 3, 0], V, temperature=0.0, gen=torch.Generator().manual_seed(2))
    rows = torch.tensor([0, 1, 2, 4, 5, 6])
    best = p.logits[rows].argmax(-1)
    p.draft_ids[:3] = best[:3]  # request 0: every draft is the argmax
    p.draft_ids[3:] = (best[3:] + 1) % V  # request 1: the first draft is wrong
    want = run_reference(p)
    assert want.num_accepted.tolist() == [3, 0, 0]
    assert want.emitted[0, 3] == p.logits[3].argmax()  # bonus row
    assert want.emitted[2, 0] == p.logits[8].argmax() and want.emitted[2, 1:].eq(-1).all()
    assert_same(run_triton(p), want)
    # every request without drafts (N = 0)
    p0 = random_chain([0, 0], V, temperature=[1.0, 0.0])
    res0 = run_triton(p0)
    assert res0.emitted.shape == (2, 1) and res0.stats["p_draft"].shape == (0,)
    assert_same(res0, run_reference(p0))


@exact
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_set_error(bad):
    p = random_chain([2, 1, 2], 20, with_q=True, temperature=[1.0, 1.0, 0.0], gen=torch.Generator().manual_seed(5))
    p.logits[4, 7] = bad  # row 4 belongs to request 1 (rows 3..4)
    want = run_reference(p)
    assert want.error.tolist() == [False, True, False]
    assert want.emitted[1].eq(-1).all() and int(want.num_accepted[1]) == 0
    assert_same(run_triton(p), want)


@exact
def test_masked_tokens_are_allowed():
    """-inf logits mean probability 0 (no error); a row that is all -inf is an error."""
    p = random_chain([1, 1], 16, temperature=1.0, gen=torch.Generator().manual_seed(8))
    p.logits[:, :8] = float("-inf")
    p.logits[3] = float("-inf")
    want = run_reference(p)
    assert want.error.tolist() == [False, True]
    assert bool((want.emitted[0][want.emitted[0] >= 0] >= 8).all())
    assert_same(run_triton(p), want)


@needs_triton
def test_same_seed_same_output_and_batch_permutation():
    counts = [2, 3, 1, 0, 2]
    p = random_chain(counts, 40, temperature=1.0, gen=torch.Generator().manual_seed(9))
    a, b = run_triton(p), run_triton(p)
    assert torch.equal(a.emitted, b.emitted)
    perm = [3, 0, 4, 2, 1]
    rows = [list(range(int(p.cu[i]) + i, int(p.cu[i + 1]) + i + 1)) for i in range(len(counts))]
    drafts = [list(range(int(p.cu[i]), int(p.cu[i + 1]))) for i in range(len(counts))]
    q = random_chain([counts[i] for i in perm], 40)
    q.logits = p.logits[[r for i in perm for r in rows[i]]]
    q.draft_ids = p.draft_ids[[d for i in perm for d in drafts[i]]]
    q.temperature, q.seeds, q.positions = p.temperature[perm], p.seeds[perm], p.positions[perm]
    c = run_triton(q)
    assert torch.equal(c.emitted.cpu(), a.emitted.cpu()[perm])
    assert torch.equal(c.num_accepted.cpu(), a.num_accepted.cpu()[perm])
    for k in ("entropy_p_last", "p_emitted", "q_emitted"):
        torch.testing.assert_close(c.stats[k].cpu(), a.stats[k].cpu()[perm], equal_nan=True)
    d = [i for j in perm for i in drafts[j]]
    torch.testing.assert_close(c.stats["p_draft"].cpu(), a.stats["p_draft"].cpu()[d])


def test_reference_seed_changes_samples():
    p = random_chain([0] * 64, 50, temperature=1.0)
    a = verify_chain(*p.args(), backend="torch")
    p.seeds = p.seeds + 1
    b = verify_chain(*p.args(), backend="torch")
    assert not torch.equal(a.emitted, b.emitted)


def test_input_errors_are_one_line_value_errors():
    p = random_chain([2, 1], 10)
    args = list(p.args())
    with pytest.raises(ValueError, match="logits must have shape"):
        verify_chain(args[0][:-1], *args[1:], backend="torch")
    with pytest.raises(ValueError, match="cu_num_draft must start at 0"):
        verify_chain(args[0], torch.tensor([0, 2, 2]), *args[2:], backend="torch")
    with pytest.raises(ValueError, match="draft_ids must lie in"):
        verify_chain(args[0], args[1], torch.tensor([0, 10, 3]), *args[3:], backend="torch")
    with pytest.raises(ValueError, match="temperature must be finite"):
        verify_chain(*args[:4], torch.tensor([1.0, -1.0]), *args[5:], backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        verify_chain(*args, backend="cuda")
    with pytest.raises(ValueError, match="draft_probs must have shape"):
        verify_chain(*args[:3], torch.ones(3, 9) / 9, *args[4:], backend="torch")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = random_chain([1], 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        verify_chain(*p.args(), backend="triton")


def test_kernels_compile_for_h100(tmp_path):
    """Every kernel compiles to sm_90 machine code with no GPU (the interpreter checks far less)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    code = "from spec_kernels.testing import compile_kernels; print(len(compile_kernels(90)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "12"


def chain_threshold_problem(with_q: bool, eps: float):
    """Requests whose drafts sit on either side of their accept threshold theta = p(x) / q(x).

    Requests 0..5 hold one draft, 6..7 two (the first just accepted). Draft i gets u = theta (1 - eps)
    (accept) or theta (1 + eps) (reject), alternating. Returns the problem, the uniforms, Gumbel noise
    with +30 at every draft's own token in its row (a residual that kept the rejected draft would emit
    it), and the hand-computed emitted tokens [B, Kmax + 1] and num_accepted [B].
    """
    counts, V, temp = [1, 1, 1, 1, 1, 1, 2, 2], 23, 0.9
    gen = torch.Generator().manual_seed(31)
    prob = random_chain(counts, V, with_q=with_q, temperature=temp, gen=gen, accept_bias=0.0)
    B, N = len(counts), sum(counts)
    req = torch.repeat_interleave(torch.arange(B), torch.tensor(counts))
    row = torch.arange(N) + req  # [N] the row that judges draft i
    p = torch.softmax(prob.logits.double() / temp, -1)  # [N + B, V]
    q = prob.draft_probs.double() if with_q else None
    # each draft: the token whose threshold is closest to 0.4, so both sides of it lie in (0, 1)
    theta_all = p[row] / q if with_q else p[row]  # [N, V]
    prob.draft_ids = (theta_all - 0.4).abs().argmin(-1)
    x = prob.draft_ids
    theta = theta_all[torch.arange(N), x]
    assert bool(((theta > 0.05) & (theta < 0.9)).all())
    below = torch.tensor([True, False, True, False, True, False, True, True, True, False])  # per draft
    u = torch.where(below, theta * (1 - eps), theta * (1 + eps)).float()
    noise = -torch.log(-torch.log(torch.rand((N + B, V), generator=gen, dtype=torch.float64)))
    noise[row, x] += 30.0
    emitted = torch.full((B, 3), -1, dtype=torch.int64)
    n_acc = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        first = int(prob.cu[b])
        for j in range(counts[b]):
            i = first + j
            if bool(below[i]):
                emitted[b, j] = x[i]
                n_acc[b] += 1
                continue
            w = (p[row[i]] - q[i]).clamp(min=0) if with_q else p[row[i]].clone()
            w[x[i]] = 0.0  # one-hot: max(0, p - onehot(x)) is 0 at x; with q, q(x) > p(x) already
            emitted[b, j] = int((w.log() + noise[row[i]]).argmax())
            break
        else:
            bonus = first + b + counts[b]
            emitted[b, counts[b]] = int((p[bonus].log() + noise[bonus]).argmax())
    return prob, u, noise.float(), emitted[:, :max(counts) + 1], n_acc


@exact
@pytest.mark.parametrize("with_q", [False, True])
def test_accept_threshold_and_residual_exact(with_q):
    """u just below p(x) / q(x) accepts and just above rejects (eps = 1e-3 relative, far above float32
    error); the recovered token is the Gumbel-max of normalise(max(0, p - q)) (one-hot: p without the
    draft), checked against a hand computation on both backends."""
    prob, u, noise, want_emitted, want_acc = chain_threshold_problem(with_q, eps=1e-3)
    want = run_reference(prob, u, noise)
    assert want.num_accepted.tolist() == want_acc.tolist()
    assert want.emitted.tolist() == want_emitted.tolist()
    got = run_triton(prob, block_v=16, chunks=2, uniforms=u.to(DEV), noise=noise.to(DEV))
    assert got.num_accepted.cpu().tolist() == want_acc.tolist()
    assert got.emitted.cpu().tolist() == want_emitted.tolist()
    assert_same(got, want)
