"""Chain verification in Triton: four launches, no host synchronisation, no [*, V] intermediate.

  1. row_stats_kernel   (B, Kmax+1, C)  every row, every vocabulary chunk: max, normaliser, entropy,
                                         argmax, q statistics                          -> partials
  2. chain_decide_kernel (B,)           per request: fold the partials of its K_b+1 rows, run the
                                         accept tests in order, write the accepted drafts, the greedy
                                         token, the draft statistics, and what still has to be drawn
  3. draw_kernel        (B, 1|Kmax+1, C) Gumbel-max over the one row per sampling request that needs a
                                         recovered or bonus token (+ sum min(p, q) when q is given)
  4. chain_finish_kernel (B,)           fold the draw partials, write the sampled token and its stats

Semantics are those of reference.verify_chain_reference (same randomness, float32 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import ChainInputs
from .launch import check_interpreter, make_plan, nonempty, rowmajor
from .results import ChainResult
from .rowpass import combine_row, draw_kernel, finish_draw, inverse_temperature, row_stats_kernel
from .triton_rng import row_key, token_uniform


@triton.jit
def chain_decide_kernel(
    logits_ptr, stride_l, q_ptr, stride_q, ids_ptr, cu_ptr, temp_ptr, seed_ptr, pos_ptr, u_ptr,
    part_ptr, pidx_ptr, C,
    row_m_ptr, row_lz_ptr,  # out [R]
    emitted_ptr, W, nacc_ptr, err_ptr,  # out [B, W], [B], [B]
    draw_row_ptr, draw_qrow_ptr, draw_kind_ptr, draw_pos_ptr,  # out [B]
    hist_tok_ptr, hist_f_ptr, hist_meta_ptr,  # out [B, HB], [B, HB, 2], [B, 2]
    pd_ptr, qd_ptr, al_ptr, hp_ptr, hq_ptr, kl_ptr,  # out [N] draft statistics
    hlast_ptr, pem_ptr, qem_ptr,  # out [B] request statistics (sampled tokens: chain_finish_kernel)
    C_BLOCK: tl.constexpr, W_BLOCK: tl.constexpr, HB: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_U: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    k_b = tl.load(cu_ptr + b + 1) - start
    row0 = start + b
    greedy = tl.load(temp_ptr + b) == 0
    inv_t = inverse_temperature(temp_ptr, b)
    seed = tl.load(seed_ptr + b)
    pos = tl.load(pos_ptr + b)
    nan = float("nan")

    # Non-finite logits (or a row with every token masked) anywhere in the request: flag it, emit nothing.
    # One 2-D load over the request's rows x chunks.
    cs = tl.arange(0, C_BLOCK)
    js = tl.arange(0, W_BLOCK)
    src = part_ptr + ((row0 + js)[:, None] * C + cs[None, :]) * 8
    in_req = (js[:, None] < k_b + 1) & (cs[None, :] < C)
    flags = tl.max(tl.max(tl.load(src + 4, mask=in_req, other=0.0), 1), 0)
    row_max = tl.max(tl.load(src, mask=in_req, other=float("-inf")), 1)  # [W_BLOCK]
    masked_row = tl.max(tl.where((row_max == float("-inf")) & (js < k_b + 1), 1.0, 0.0), 0)
    bad = tl.maximum(flags, masked_row)
    error = bad > 0

    alive = tl.full([], 1, tl.int32)
    n_acc = tl.zeros([], tl.int64)
    f_row = row0 + k_b  # the row that gives the final token: bonus row unless a draft is rejected
    f_kind = tl.full([], 2, tl.int32)  # 1 recovered, 2 bonus
    f_entropy = tl.zeros([], tl.float32)
    f_argmax = tl.zeros([], tl.int32)
    f_logp_max = tl.zeros([], tl.float32)
    f_x = tl.zeros([], tl.int64)
    f_i = tl.zeros([], tl.int64)
    for j in range(0, k_b + 1):
        r = row0 + j
        m, log_z, entropy, argmax, best, _, entropy_q, kl = combine_row(part_ptr, pidx_ptr, r, C, C_BLOCK, HAS_Q)
        tl.store(row_m_ptr + r, m)
        tl.store(row_lz_ptr + r, log_z)
        is_draft = j < k_b
        i = start + j
        x = tl.load(ids_ptr + i, mask=is_draft, other=0)
        px = tl.exp(tl.load(logits_ptr + r * stride_l + x).to(tl.float32) * inv_t - m - log_z)
        if HAS_Q:
            qx = tl.load(q_ptr + i * stride_q + x, mask=is_draft, other=1.0).to(tl.float32)
        else:
            qx = tl.full([], 1.0, tl.float32)
        if HAS_U:
            u = tl.load(u_ptr + i, mask=is_draft, other=1.0)
        else:
            u = token_uniform(row_key(seed, pos + j, 0), x)
        accept = tl.where(greedy, x == argmax, u * qx < px)
        take = (alive > 0) & is_draft
        n_acc += (take & accept).to(tl.int64)
        rejected = take & (accept == 0)
        alive = tl.where(rejected, 0, alive)
        final = rejected | ((alive > 0) & (j == k_b))
        f_row = tl.where(rejected, r, f_row)
        f_kind = tl.where(rejected, 1, f_kind)
        f_x = tl.where(rejected, x, f_x)
        f_i = tl.where(rejected, i, f_i)
        f_entropy = tl.where(final, entropy, f_entropy)
        f_argmax = tl.where(final, argmax, f_argmax)
        f_logp_max = tl.where(final, best - m - log_z, f_logp_max)

        if HAS_Q:
            alpha_i = tl.full([], nan, tl.float32)  # sum min(p, q): chain_finish_kernel
        else:
            alpha_i = px
        tl.store(pd_ptr + i, tl.where(error, nan, px), mask=is_draft)
        tl.store(qd_ptr + i, tl.where(error, nan, qx), mask=is_draft)
        tl.store(al_ptr + i, tl.where(error, nan, alpha_i), mask=is_draft)
        tl.store(hp_ptr + i, tl.where(error, nan, entropy), mask=is_draft)
        tl.store(hq_ptr + i, tl.where(error, nan, entropy_q), mask=is_draft)
        tl.store(kl_ptr + i, tl.where(error, nan, kl), mask=is_draft)

    n_acc = tl.where(error, 0, n_acc)
    cols = tl.arange(0, W_BLOCK)
    drafts = tl.load(ids_ptr + start + cols, mask=cols < k_b, other=-1)
    row_out = tl.where(cols < n_acc, drafts, -1)
    row_out = tl.where(cols == tl.where(greedy, n_acc, -1), f_argmax.to(tl.int64), row_out)
    row_out = tl.where(error, -1, row_out)
    tl.store(emitted_ptr + b * W + cols, row_out, mask=cols < W)
    tl.store(nacc_ptr + b, n_acc)
    tl.store(err_ptr + b, error)

    kind = tl.where(error | greedy, 0, f_kind)
    tl.store(draw_row_ptr + b, f_row)
    tl.store(draw_qrow_ptr + b, f_i)
    tl.store(draw_kind_ptr + b, kind)
    tl.store(draw_pos_ptr + b, pos + n_acc)
    tl.store(hist_tok_ptr + b * HB, f_x)
    tl.store(hist_f_ptr + b * HB * 2, 1.0)
    tl.store(hist_f_ptr + b * HB * 2 + 1, 1.0)
    tl.store(hist_meta_ptr + b * 2, (f_kind == 1).to(tl.int32))
    tl.store(hist_meta_ptr + b * 2 + 1, 0)

    # Greedy tokens are final here; sampled ones get their statistics in chain_finish_kernel.
    if HAS_Q:
        q_tok = tl.load(q_ptr + f_i * stride_q + f_argmax, mask=f_kind == 1, other=0.0).to(tl.float32)
    else:
        q_tok = (f_argmax.to(tl.int64) == f_x).to(tl.float32)
    q_emitted = tl.where(f_kind == 1, q_tok, nan)
    tl.store(hlast_ptr + b, tl.where(error, nan, f_entropy))
    tl.store(pem_ptr + b, tl.where(error, nan, tl.exp(f_logp_max)), mask=greedy | error)
    tl.store(qem_ptr + b, tl.where(error, nan, q_emitted), mask=greedy | error)


@triton.jit
def chain_finish_kernel(
    logits_ptr, stride_l, q_ptr, stride_q, cu_ptr, temp_ptr,
    draw_row_ptr, draw_qrow_ptr, draw_kind_ptr, row_m_ptr, row_lz_ptr, hist_tok_ptr,
    dpart_ptr, didx_ptr, apart_ptr, C,
    emitted_ptr, W, nacc_ptr, err_ptr, al_ptr, pem_ptr, qem_ptr,
    C_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, HB: tl.constexpr, HAS_Q: tl.constexpr,
):
    b = tl.program_id(0)
    kind = tl.load(draw_kind_ptr + b)
    sampled = kind > 0
    tok = finish_draw(dpart_ptr, didx_ptr, b, C, kind, C_BLOCK)
    n_acc = tl.load(nacc_ptr + b)
    tl.store(emitted_ptr + b * W + n_acc, tok.to(tl.int64), mask=sampled)
    row = tl.load(draw_row_ptr + b)
    q_row = tl.load(draw_qrow_ptr + b)
    inv_t = inverse_temperature(temp_ptr, b)
    x = tl.load(logits_ptr + row * stride_l + tok, mask=sampled, other=0.0).to(tl.float32) * inv_t
    m = tl.load(row_m_ptr + row, mask=sampled, other=0.0)
    log_z = tl.load(row_lz_ptr + row, mask=sampled, other=0.0)
    if HAS_Q:
        q_tok = tl.load(q_ptr + q_row * stride_q + tok, mask=kind == 1, other=0.0).to(tl.float32)
    else:
        q_tok = (tok.to(tl.int64) == tl.load(hist_tok_ptr + b * HB)).to(tl.float32)
    tl.store(pem_ptr + b, tl.exp(x - m - log_z), mask=sampled)
    tl.store(qem_ptr + b, tl.where(kind == 1, q_tok, float("nan")), mask=sampled)

    if HAS_Q:
        start = tl.load(cu_ptr + b)
        k_b = tl.load(cu_ptr + b + 1) - start
        error = tl.load(err_ptr + b)
        js = tl.arange(0, K_BLOCK)
        cs = tl.arange(0, C_BLOCK)
        rows = start + b + js
        parts = tl.load(apart_ptr + rows[:, None] * C + cs[None, :],
                        mask=(js[:, None] < k_b) & (cs[None, :] < C), other=0.0)
        alpha = tl.sum(parts, 1)
        tl.store(al_ptr + start + js, tl.where(error, float("nan"), alpha), mask=js < k_b)


def verify_chain_triton(inp: ChainInputs, block_v: int | None = None, chunks: int | None = None) -> ChainResult:
    """Launch the chain kernels on validated inputs (block_v / chunks override the launch plan)."""
    if inp.logits.device.type != "cuda":
        check_interpreter(row_stats_kernel)
    dev = inp.logits.device
    B, N, V, K = inp.B, inp.N, inp.V, inp.kmax
    R, W = N + B, K + 1
    plan = make_plan(R, V, dev, block_v, chunks)
    C = plan.chunks
    logits = rowmajor(inp.logits)
    has_q = inp.draft_probs is not None
    q = rowmajor(inp.draft_probs) if has_q else logits
    ids = nonempty(inp.draft_ids, torch.int64)
    u = nonempty(inp.uniforms, torch.float32) if inp.uniforms is not None else logits
    noise = rowmajor(inp.noise) if inp.noise is not None else logits
    f32, i64, i32 = torch.float32, torch.int64, torch.int32

    part = torch.empty((R, C, 8), dtype=f32, device=dev)
    pidx = torch.empty((R, C), dtype=i32, device=dev)
    row_stats_kernel[(B, W, C)](
        logits, logits.stride(0), q, q.stride(0), inp.cu, inp.cu, inp.temperature, part, pidx,
        V, 0, C, plan.tiles_per_chunk, TREE=False, HAS_Q=has_q, BLOCK_V=plan.block_v, num_warps=plan.num_warps)

    row_m = torch.empty(R, dtype=f32, device=dev)
    row_lz = torch.empty(R, dtype=f32, device=dev)
    emitted = torch.empty((B, W), dtype=i64, device=dev)
    n_acc = torch.empty(B, dtype=i64, device=dev)
    error = torch.empty(B, dtype=torch.bool, device=dev)
    draw = {k: torch.empty(B, dtype=i64, device=dev) for k in ("row", "qrow", "pos")}
    draw_kind = torch.empty(B, dtype=i32, device=dev)
    HB = 1
    hist_tok = torch.empty((B, HB), dtype=i64, device=dev)
    hist_f = torch.empty((B, HB, 2), dtype=f32, device=dev)
    hist_meta = torch.empty((B, 2), dtype=i32, device=dev)
    draft_stats = {k: torch.empty(max(N, 1), dtype=f32, device=dev)
                   for k in ("p_draft", "q_draft", "alpha", "entropy_p", "entropy_q", "kl")}
    req_stats = {k: torch.empty(B, dtype=f32, device=dev) for k in ("entropy_p_last", "p_emitted", "q_emitted")}
    W_BLOCK = triton.next_power_of_2(W)
    chain_decide_kernel[(B,)](
        logits, logits.stride(0), q, q.stride(0), ids, inp.cu, inp.temperature, inp.seeds, inp.positions, u,
        part, pidx, C, row_m, row_lz, emitted, W, n_acc, error,
        draw["row"], draw["qrow"], draw_kind, draw["pos"], hist_tok, hist_f, hist_meta,
        *draft_stats.values(), *req_stats.values(),
        C_BLOCK=plan.c_block, W_BLOCK=W_BLOCK, HB=HB, HAS_Q=has_q, HAS_U=inp.uniforms is not None, num_warps=1)

    # The draw pass reads one row per request (plus every draft row for sum min(p, q) when q is given).
    dplan = plan if has_q else make_plan(B, V, dev, block_v, chunks)
    C = dplan.chunks
    dpart = torch.empty((B, C, 2), dtype=f32, device=dev)
    didx = torch.empty((B, C, 2), dtype=i32, device=dev)
    apart = torch.empty((R, C), dtype=f32, device=dev) if has_q else dpart
    draw_kernel[(B, W if has_q else 1, C)](
        logits, logits.stride(0), q, q.stride(0), noise, noise.stride(0),
        inp.cu, inp.cu, inp.temperature, inp.seeds,
        draw["row"], draw["qrow"], draw_kind, draw["pos"], row_m, row_lz,
        hist_tok, hist_f, hist_meta, dpart, didx, apart,
        V, 0, C, dplan.tiles_per_chunk,
        TREE=False, HAS_Q=has_q, HAS_NOISE=inp.noise is not None, HB=HB, BLOCK_V=dplan.block_v,
        num_warps=dplan.num_warps)

    chain_finish_kernel[(B,)](
        logits, logits.stride(0), q, q.stride(0), inp.cu, inp.temperature,
        draw["row"], draw["qrow"], draw_kind, row_m, row_lz, hist_tok,
        dpart, didx, apart, C, emitted, W, n_acc, error,
        draft_stats["alpha"], req_stats["p_emitted"], req_stats["q_emitted"],
        C_BLOCK=dplan.c_block, K_BLOCK=W_BLOCK, HB=HB, HAS_Q=has_q, num_warps=1)

    stats = {k: v[:N] for k, v in draft_stats.items()} | req_stats
    return ChainResult(emitted, n_acc, error, stats)
