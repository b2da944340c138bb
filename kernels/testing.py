"""Test helpers: random verification problems and a faster Triton interpreter for CPU tests.

Nothing here is used by verify_chain / verify_tree.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def fast_interpreter():
    """Skip the interpreter's re-patching of triton.language on every nested @triton.jit call.

    Triton's interpreter patches the language module at each launch (kept) and again at each call of
    a nested jit function (redundant within a launch, and several milliseconds each). This context
    patches each function's module once per launch instead; results are unchanged. It does nothing
    when the interpreter's internals differ from what it expects.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    fn_cls = getattr(interpreter, "InterpretedFunction", None)
    grid_cls = getattr(interpreter, "GridExecutor", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if fn_cls is None or grid_cls is None or patch_lang is None or not hasattr(fn_cls, "rewrite"):
        yield
        return
    patched: set[int] = set()
    old_fn_call, old_grid_call = fn_cls.__call__, grid_cls.__call__

    def grid_call(self, *args, **kwargs):
        patched.clear()
        return old_grid_call(self, *args, **kwargs)

    def fn_call(self, *args, **kwargs):
        key = id(self.fn.__globals__)
        if key not in patched:
            patch_lang(self.fn)
            patched.add(key)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    fn_cls.__call__, grid_cls.__call__ = fn_call, grid_call
    try:
        yield
    finally:
        fn_cls.__call__, grid_cls.__call__ = old_fn_call, old_grid_call


@dataclass
class ChainProblem:
    logits: torch.Tensor  # [N + B, V]
    cu: torch.Tensor  # [B + 1]
    draft_ids: torch.Tensor  # [N]
    draft_probs: torch.Tensor | None  # [N, V]
    temperature: torch.Tensor  # [B]
    seeds: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]

    def args(self):
        return (self.logits, self.cu, self.draft_ids, self.draft_probs, self.temperature, self.seeds, self.positions)


def random_chain(counts: list[int], vocab: int, *, with_q: bool = False, temperature: float | list[float] = 1.0,
                 scale: float = 2.0, dtype: torch.dtype = torch.float32, gen: torch.Generator | None = None,
                 accept_bias: float = 0.5) -> ChainProblem:
    """A random ragged batch. With probability accept_bias a draft is the row's argmax (so greedy and
    sampling chains get past their first draft often enough to exercise the later rows)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    B, N = len(counts), sum(counts)
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    logits = torch.randn((N + B, vocab), generator=gen) * scale
    req = torch.repeat_interleave(torch.arange(B), torch.tensor(counts, dtype=torch.int64), output_size=N)
    rows = torch.arange(N) + req
    draft_ids = torch.randint(0, vocab, (N,), generator=gen)
    pick = torch.rand(N, generator=gen) < accept_bias
    draft_ids = torch.where(pick, logits[rows].argmax(-1), draft_ids)
    draft_probs = None
    if with_q:
        draft_probs = torch.softmax(logits[rows] + torch.randn((N, vocab), generator=gen), -1)
    temps = temperature if isinstance(temperature, list) else [temperature] * B
    return ChainProblem(logits.to(dtype), cu, draft_ids, draft_probs, torch.tensor(temps, dtype=torch.float32),
                        torch.randint(0, 2**62, (B,), generator=gen), torch.randint(0, 10_000, (B,), generator=gen))


@dataclass
class TreeProblem:
    logits: torch.Tensor  # [B, T, V]
    tokens: torch.Tensor  # [B, T]
    parents: torch.Tensor  # [B, T]
    num_nodes: torch.Tensor  # [B]
    draft_probs: torch.Tensor | None  # [B, T, V]
    temperature: torch.Tensor
    seeds: torch.Tensor
    positions: torch.Tensor

    def args(self):
        return (self.logits, self.tokens, self.parents, self.num_nodes, self.draft_probs, self.temperature,
                self.seeds, self.positions)


def random_tree(batch: int, nodes: int, vocab: int, *, with_q: bool = False, temperature: float | list[float] = 1.0,
                scale: float = 2.0, gen: torch.Generator | None = None, accept_bias: float = 0.5) -> TreeProblem:
    """Random trees of `nodes` slots (each request uses 1..nodes of them), parents drawn uniformly among
    earlier nodes; children of a node are drawn from that node's q (or biased to its argmax)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    B, T, V = batch, nodes, vocab
    logits = torch.randn((B, T, V), generator=gen) * scale
    q = torch.softmax(logits + torch.randn((B, T, V), generator=gen), -1) if with_q else None
    parents = torch.full((B, T), -1, dtype=torch.int64)
    tokens = torch.zeros((B, T), dtype=torch.int64)
    num_nodes = torch.randint(1, T + 1, (B,), generator=gen)
    num_nodes[0] = T
    for n in range(1, T):
        par = (torch.rand(B, generator=gen) * n).long()
        parents[:, n] = par
        par_logits = logits[torch.arange(B), par]  # [B, V]
        if q is not None:
            tok = torch.multinomial(q[torch.arange(B), par], 1, generator=gen)[:, 0]
        else:
            tok = torch.randint(0, V, (B,), generator=gen)
        best = par_logits.argmax(-1)
        tokens[:, n] = torch.where(torch.rand(B, generator=gen) < accept_bias, best, tok)
    temps = temperature if isinstance(temperature, list) else [temperature] * B
    return TreeProblem(logits, tokens, parents, num_nodes, q, torch.tensor(temps, dtype=torch.float32),
                       torch.randint(0, 2**62, (B,), generator=gen), torch.randint(0, 10_000, (B,), generator=gen))


# The peaked-q repro: q's top entry is exactly 1.0 in float32 while the others stay > 0, so a sibling
# normaliser computed as 1 - (drawn mass) is 0. The emitted token must still follow PEAKED_P.
PEAKED_P = (0.597, 0.133, 0.099, 0.081, 0.060, 0.030)
PEAKED_Q_LOGITS = (30.0, 10.0, 9.0, 8.0, 7.0, 6.0)  # softmax: q[0] == 1.0 in float32, q[1:] ~ 1e-9


def peaked_tree(draws: int, seed: int = 0, siblings: int = 2) -> TreeProblem:
    """`draws` requests of a root with `siblings` children drawn from the peaked q without replacement
    (in float64, so the tiny entries are drawn at their true rates); root row p = PEAKED_P, T = 1."""
    V, T = len(PEAKED_P), siblings + 1
    gen = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.tensor(PEAKED_Q_LOGITS), -1)  # float32
    assert float(q[0]) == 1.0 and bool((q[1:] > 0).all())
    logits = torch.zeros(draws, T, V)
    logits[:, 0] = torch.tensor(PEAKED_P, dtype=torch.float64).log().float()
    tokens = torch.zeros(draws, T, dtype=torch.int64)
    tokens[:, 1:] = torch.multinomial(q.double().expand(draws, V), siblings, replacement=False, generator=gen)
    parents = torch.full((draws, T), -1, dtype=torch.int64)
    parents[:, 1:] = 0
    draft_probs = torch.zeros(draws, T, V)
    draft_probs[:, 0] = q
    return TreeProblem(logits, tokens, parents, torch.full((draws,), T), draft_probs, torch.ones(draws),
                       torch.arange(draws) + 1_000_003 * seed, torch.zeros(draws, dtype=torch.int64))


def compile_kernels(arch: int = 90, everything: bool = False) -> list[str]:
    """Compile the Triton kernels ahead of time for an NVIDIA target (default sm_90, H100) with no GPU
    present, so a CPU-only CI catches code that the interpreter accepts but the compiler rejects.

    Needs TRITON_INTERPRET unset when spec_kernels' kernel modules are first imported (run it in a
    fresh process). Returns "name {constexprs}" for each compiled variant.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import chain, rowpass, tree

    pointer_types = {n: "*i64" for n in (
        "cu_ptr", "nn_ptr", "ids_ptr", "seed_ptr", "pos_ptr", "draw_row_ptr", "draw_qrow_ptr", "draw_pos_ptr",
        "hist_tok_ptr", "emitted_ptr", "nacc_ptr", "path_ptr", "tok_ptr", "par_ptr")}
    pointer_types |= {n: "*i32" for n in ("pidx_ptr", "didx_ptr", "draw_kind_ptr", "hist_meta_ptr")}
    pointer_types |= {"err_ptr": "*i1", "logits_ptr": "*bf16", "q_ptr": "*fp32"}
    wide = {"stride_l", "stride_q", "stride_n"}
    target = GPUTarget("cuda", arch, 32)
    flags = [(False, False), (True, True)] + ([(False, True), (True, False)] if everything else [])
    variants = []
    for a, b in flags:
        variants += [
            (rowpass.row_stats_kernel, dict(TREE=a, HAS_Q=b, BLOCK_V=4096), 8),
            (rowpass.draw_kernel, dict(TREE=a, HAS_Q=b, HAS_NOISE=a, HB=4, BLOCK_V=4096), 8),
            (chain.chain_decide_kernel, dict(C_BLOCK=4, W_BLOCK=8, HB=1, HAS_Q=a, HAS_U=b), 1),
            (chain.chain_finish_kernel, dict(C_BLOCK=4, K_BLOCK=8, HB=1, HAS_Q=b), 1),
            (tree.tree_walk_kernel, dict(C_BLOCK=4, W_BLOCK=8, HB=4, BLOCK_V=4096, HAS_Q=a, HAS_U=b), 8),
            (tree.tree_finish_kernel, dict(C_BLOCK=4, T_BLOCK=16, HB=4, HAS_Q=b), 1),
        ]
    done = []
    for fn, consts, warps in variants:
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = pointer_types.get(name, "*fp32")
            else:
                sig[name] = "i64" if name in wide else "i32"
        triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": warps})
        done.append(f"{fn.__name__} {consts}")
    return done
