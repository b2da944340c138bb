"""Tree verification in Triton (SpecInfer / EAGLE-2 recursive rejection sampling).

  1. row_stats_kernel  (B, T, C)  every node row: max, normaliser, entropy, argmax, q statistics
  2. tree_walk_kernel  (B,)       per request: fold its rows, walk from the root trying children in
                                  index order. One-hot drafter: the residual after rejecting tokens
                                  t_1..t_k is p without them, renormalised, so each test is scalar.
                                  With q: each rejection needs the new residual's mass S and the
                                  next sibling's normaliser D (the q mass of the tokens not yet
                                  drawn, summed directly), one pass over that row's vocabulary
                                  inside this program.
  3. draw_kernel       (B, 1|T, C) Gumbel-max over the final row's residual (or p for a leaf)
  4. tree_finish_kernel (B,)      sampled token, its statistics, per-node statistics

Semantics are those of reference.verify_tree_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import TreeInputs
from .launch import check_interpreter, make_plan, rowmajor
from .results import TreeResult
from .rowpass import (combine_row, draw_kernel, finish_draw, hist_entry, inverse_temperature, row_q_sum,
                      row_stats_kernel)
from .triton_rng import row_key, token_uniform


@triton.jit
def tree_walk_kernel(
    logits_ptr, stride_l, q_ptr, stride_q, tok_ptr, par_ptr, nn_ptr, temp_ptr, seed_ptr, pos_ptr, u_ptr,
    part_ptr, pidx_ptr, C, T, V, DMAX, W,
    row_m_ptr, row_lz_ptr, row_h_ptr, row_hq_ptr, row_kl_ptr,  # out [B*T]
    path_ptr, emitted_ptr, nacc_ptr, err_ptr,  # out [B, W], [B, W], [B], [B]
    draw_row_ptr, draw_qrow_ptr, draw_kind_ptr, draw_pos_ptr,  # out [B]
    hist_tok_ptr, hist_f_ptr, hist_meta_ptr,  # out [B, HB], [B, HB, 2], [B, 2]
    hlast_ptr, pem_ptr, qem_ptr,  # out [B]
    C_BLOCK: tl.constexpr, W_BLOCK: tl.constexpr, HB: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_U: tl.constexpr,
):
    b = tl.program_id(0)
    nn = tl.load(nn_ptr + b)
    base = b.to(tl.int64) * T
    greedy = tl.load(temp_ptr + b) == 0
    inv_t = inverse_temperature(temp_ptr, b)
    seed = tl.load(seed_ptr + b)
    pos = tl.load(pos_ptr + b)

    # Fold every node row once: row arrays for the later kernels, and the error flag.
    bad = tl.zeros([], tl.int32)
    for n in range(0, nn):
        m, log_z, entropy, _, _, bad_n, entropy_q, kl = combine_row(part_ptr, pidx_ptr, base + n, C, C_BLOCK, HAS_Q)
        tl.store(row_m_ptr + base + n, m)
        tl.store(row_lz_ptr + base + n, log_z)
        tl.store(row_h_ptr + base + n, entropy)
        tl.store(row_hq_ptr + base + n, entropy_q)
        tl.store(row_kl_ptr + base + n, kl)
        bad = tl.maximum(bad, bad_n.to(tl.int32))
    error = bad > 0

    ds = tl.arange(0, W_BLOCK)
    hs = tl.arange(0, HB)
    path_v = tl.where(ds == 0, 0, -1).to(tl.int64)
    emit_v = tl.full([W_BLOCK], -1, tl.int64)
    node = tl.zeros([], tl.int64)
    depth = tl.zeros([], tl.int64)
    alive = tl.where(error, 0, 1)
    f_kind = tl.full([], 2, tl.int32)
    f_entropy = tl.zeros([], tl.float32)
    f_argmax = tl.zeros([], tl.int32)
    f_logp_max = tl.zeros([], tl.float32)
    h_tok = tl.full([HB], -1, tl.int64)
    h_d = tl.full([HB], 1.0, tl.float32)
    h_s = tl.full([HB], 1.0, tl.float32)
    h_len = tl.zeros([], tl.int32)
    h_start = tl.zeros([], tl.int32)
    for _step in range(0, DMAX + 1):
        if alive > 0:
            r = base + node
            row_ptr = logits_ptr + r * stride_l
            q_row_ptr = q_ptr + r * stride_q
            m, log_z, entropy, argmax, best, _, _, _ = combine_row(part_ptr, pidx_ptr, r, C, C_BLOCK, HAS_Q)
            key = row_key(seed, pos + depth, 0)
            h_tok = tl.full([HB], -1, tl.int64)
            h_len = tl.zeros([], tl.int32)
            h_start = tl.zeros([], tl.int32)
            mass = tl.full([], 1.0, tl.float32)  # one-hot: p mass not yet rejected (since the last reset)
            d_cur = tl.zeros([], tl.float32)  # with q: D, the q mass of the tokens not yet drawn
            if HAS_Q:
                d_cur = row_q_sum(part_ptr, r, C, C_BLOCK)
            chosen = tl.full([], -1, tl.int64)
            n_kids = tl.zeros([], tl.int32)
            for c in range(node + 1, nn):
                is_kid = (tl.load(par_ptr + base + c) == node) & (chosen < 0)
                if is_kid:
                    n_kids += 1
                    x = tl.load(tok_ptr + base + c)
                    px = tl.exp(tl.load(row_ptr + x).to(tl.float32) * inv_t - m - log_z)
                    if HAS_U:
                        u = tl.load(u_ptr + base + c)
                    else:
                        u = token_uniform(key, x)
                    seen = tl.sum(((hs < h_len) & (h_tok == x)).to(tl.int32), 0) > 0
                    if HAS_Q:
                        qx = tl.load(q_row_ptr + x).to(tl.float32)
                        q_cur = tl.where(seen | (d_cur <= 0), 0.0, qx / tl.where(d_cur > 0, d_cur, 1.0))
                        rx = px  # r(x) after the earlier rejections at this node
                        for h in range(0, h_len):
                            d_h = hist_entry(hs, h_d, h)
                            s_h = hist_entry(hs, h_s, h)
                            seen_h = tl.sum(((hs < h) & (h_tok == x)).to(tl.int32), 0) > 0
                            q_h = tl.where(seen_h | (d_h <= 0), 0.0, qx / tl.where(d_h > 0, d_h, 1.0))
                            w = tl.maximum(rx - q_h, 0.0)
                            rx = tl.where(s_h > 0, w / tl.where(s_h > 0, s_h, 1.0), px)
                        accept = (q_cur > 0) & (u * q_cur < rx)  # q'(x) = 0 rejects x
                    else:
                        excluded = tl.sum(((hs >= h_start) & (hs < h_len) & (h_tok == x)).to(tl.int32), 0) > 0
                        accept = (u * mass < px) & (excluded == 0)
                    accept = tl.where(greedy, x == argmax, accept)
                    if accept:
                        chosen = c
                    else:
                        if greedy == 0:
                            if HAS_Q:
                                # S = sum_v max(0, r(v) - q'(v)): the new residual's mass, and the next
                                # sibling's D = sum of q over the tokens not drawn so far (x included).
                                inv_d_cur = tl.where(d_cur > 0, 1.0 / tl.where(d_cur > 0, d_cur, 1.0), 0.0)
                                s_vec = tl.zeros([BLOCK_V], tl.float32)
                                d_vec = tl.zeros([BLOCK_V], tl.float32)
                                for t in range(0, tl.cdiv(V, BLOCK_V)):
                                    offs = t * BLOCK_V + tl.arange(0, BLOCK_V)
                                    mask = offs < V
                                    pv = tl.exp(tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
                                                * inv_t - m - log_z)
                                    qv = tl.load(q_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                                    rv = pv
                                    zeroed = offs < 0
                                    for h in range(0, h_len):
                                        d_h = hist_entry(hs, h_d, h)
                                        s_h = hist_entry(hs, h_s, h)
                                        inv_d_h = tl.where(d_h > 0, 1.0 / tl.where(d_h > 0, d_h, 1.0), 0.0)
                                        w = tl.maximum(rv - tl.where(zeroed, 0.0, qv * inv_d_h), 0.0)
                                        rv = tl.where(s_h > 0, w / tl.where(s_h > 0, s_h, 1.0), pv)
                                        zeroed = zeroed | (offs == hist_entry(hs, h_tok, h))
                                    s_vec += tl.maximum(rv - tl.where(zeroed, 0.0, qv * inv_d_cur), 0.0)
                                    d_vec += tl.where(zeroed | (offs == x), 0.0, qv)
                                s_new = tl.sum(s_vec, 0)
                                h_d = tl.where(hs == h_len, d_cur, h_d)
                                h_s = tl.where(hs == h_len, s_new, h_s)
                                d_cur = tl.sum(d_vec, 0)
                            else:
                                mass -= tl.where(excluded, 0.0, px)
                                reset = mass <= 0
                                h_start = tl.where(reset, h_len + 1, h_start)
                                mass = tl.where(reset, 1.0, mass)
                            h_tok = tl.where(hs == h_len, x, h_tok)
                            h_len += 1
            if chosen >= 0:
                depth += 1
                path_v = tl.where(ds == depth, chosen, path_v)
                emit_v = tl.where(ds == depth - 1, tl.load(tok_ptr + base + chosen), emit_v)
                node = chosen
            else:
                alive = tl.zeros([], tl.int32)
                f_kind = tl.where(n_kids > 0, 1, 2)
                f_entropy = entropy
                f_argmax = argmax
                f_logp_max = best - m - log_z

    n_acc = tl.where(error, 0, depth)
    emit_v = tl.where(ds == tl.where(greedy, n_acc, -1), f_argmax.to(tl.int64), emit_v)
    emit_v = tl.where(error, -1, emit_v)
    tl.store(path_ptr + b * W + ds, path_v, mask=ds < W)
    tl.store(emitted_ptr + b * W + ds, emit_v, mask=ds < W)
    tl.store(nacc_ptr + b, n_acc)
    tl.store(err_ptr + b, error)

    kind = tl.where(error | greedy, 0, f_kind)
    tl.store(draw_row_ptr + b, base + node)
    tl.store(draw_qrow_ptr + b, base + node)
    tl.store(draw_kind_ptr + b, kind)
    tl.store(draw_pos_ptr + b, pos + depth)
    tl.store(hist_tok_ptr + b * HB + hs, h_tok)
    tl.store(hist_f_ptr + (b * HB + hs) * 2, h_d)
    tl.store(hist_f_ptr + (b * HB + hs) * 2 + 1, h_s)
    tl.store(hist_meta_ptr + b * 2, h_len)
    tl.store(hist_meta_ptr + b * 2 + 1, h_start)

    nan = float("nan")
    if HAS_Q:
        q_tok = tl.load(q_ptr + (base + node) * stride_q + f_argmax, mask=f_kind == 1, other=0.0).to(tl.float32)
    else:
        q_tok = tl.zeros([], tl.float32)  # greedy rejected every child, so none has the argmax token
    tl.store(hlast_ptr + b, tl.where(error, nan, f_entropy))
    tl.store(pem_ptr + b, tl.where(error, nan, tl.exp(f_logp_max)), mask=greedy | error)
    tl.store(qem_ptr + b, tl.where(error, nan, tl.where(f_kind == 1, q_tok, nan)), mask=greedy | error)


@triton.jit
def tree_finish_kernel(
    logits_ptr, stride_l, q_ptr, stride_q, tok_ptr, par_ptr, nn_ptr, temp_ptr,
    draw_row_ptr, draw_kind_ptr, row_m_ptr, row_lz_ptr, row_h_ptr, row_hq_ptr, row_kl_ptr,
    hist_tok_ptr, hist_meta_ptr, dpart_ptr, didx_ptr, apart_ptr, C, T, W,
    emitted_ptr, nacc_ptr, err_ptr, pem_ptr, qem_ptr,
    pd_ptr, qd_ptr, al_ptr, hp_ptr, hq_ptr, kl_ptr,  # out [B, T]
    C_BLOCK: tl.constexpr, T_BLOCK: tl.constexpr, HB: tl.constexpr, HAS_Q: tl.constexpr,
):
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    kind = tl.load(draw_kind_ptr + b)
    sampled = kind > 0
    tok = finish_draw(dpart_ptr, didx_ptr, b, C, kind, C_BLOCK)
    n_acc = tl.load(nacc_ptr + b)
    tl.store(emitted_ptr + b * W + n_acc, tok.to(tl.int64), mask=sampled)
    row = tl.load(draw_row_ptr + b)
    inv_t = inverse_temperature(temp_ptr, b)
    x = tl.load(logits_ptr + row * stride_l + tok, mask=sampled, other=0.0).to(tl.float32) * inv_t
    m = tl.load(row_m_ptr + row, mask=sampled, other=0.0)
    log_z = tl.load(row_lz_ptr + row, mask=sampled, other=0.0)
    if HAS_Q:
        q_tok = tl.load(q_ptr + row * stride_q + tok, mask=kind == 1, other=0.0).to(tl.float32)
    else:
        hs = tl.arange(0, HB)
        h_len = tl.load(hist_meta_ptr + b * 2)
        h_tok = tl.load(hist_tok_ptr + b * HB + hs)
        q_tok = (tl.sum(((hs < h_len) & (h_tok == tok)).to(tl.int32), 0) > 0).to(tl.float32)
    tl.store(pem_ptr + b, tl.exp(x - m - log_z), mask=sampled)
    tl.store(qem_ptr + b, tl.where(kind == 1, q_tok, float("nan")), mask=sampled)

    # Per-node statistics: node n's token under its parent's row (NaN at the root, padding, errors).
    ns = tl.arange(0, T_BLOCK)
    n_valid = tl.where(tl.load(err_ptr + b), 0, tl.load(nn_ptr + b))
    valid = (ns >= 1) & (ns < n_valid)
    par = tl.load(par_ptr + base + ns, mask=valid, other=0)
    tok_n = tl.load(tok_ptr + base + ns, mask=valid, other=0)
    prow = base + par
    pm = tl.load(row_m_ptr + prow, mask=valid, other=0.0)
    plz = tl.load(row_lz_ptr + prow, mask=valid, other=0.0)
    px = tl.exp(tl.load(logits_ptr + prow * stride_l + tok_n, mask=valid, other=0.0).to(tl.float32) * inv_t - pm - plz)
    if HAS_Q:
        qd = tl.load(q_ptr + prow * stride_q + tok_n, mask=valid, other=0.0).to(tl.float32)
        cs = tl.arange(0, C_BLOCK)
        parts = tl.load(apart_ptr + prow[:, None] * C + cs[None, :], mask=valid[:, None] & (cs[None, :] < C),
                        other=0.0)
        alpha = tl.sum(parts, 1)
        hq = tl.load(row_hq_ptr + prow, mask=valid, other=0.0)
        kl = tl.load(row_kl_ptr + prow, mask=valid, other=0.0)
    else:
        qd = tl.full([T_BLOCK], 1.0, tl.float32)
        alpha = px
        hq = tl.zeros([T_BLOCK], tl.float32)
        kl = tl.full([T_BLOCK], float("nan"), tl.float32)
    hp = tl.load(row_h_ptr + prow, mask=valid, other=0.0)
    out = base + ns
    keep = ns < T
    nan = float("nan")
    tl.store(pd_ptr + out, tl.where(valid, px, nan), mask=keep)
    tl.store(qd_ptr + out, tl.where(valid, qd, nan), mask=keep)
    tl.store(al_ptr + out, tl.where(valid, alpha, nan), mask=keep)
    tl.store(hp_ptr + out, tl.where(valid, hp, nan), mask=keep)
    tl.store(hq_ptr + out, tl.where(valid, hq, nan), mask=keep)
    tl.store(kl_ptr + out, tl.where(valid, kl, nan), mask=keep)


def verify_tree_triton(inp: TreeInputs, block_v: int | None = None, chunks: int | None = None) -> TreeResult:
    """Launch the tree kernels on validated inputs (block_v / chunks override the launch plan)."""
    if inp.logits.device.type != "cuda":
        check_interpreter(row_stats_kernel)
    dev = inp.logits.device
    B, T, V = inp.B, inp.T, inp.V
    R, W = B * T, inp.dmax + 1
    plan = make_plan(R, V, dev, block_v, chunks)
    C = plan.chunks
    logits = rowmajor(inp.logits.reshape(R, V))
    has_q = inp.draft_probs is not None
    q = rowmajor(inp.draft_probs.reshape(R, V)) if has_q else logits
    u = inp.uniforms.contiguous() if inp.uniforms is not None else logits
    noise = rowmajor(inp.noise.reshape(R, V)) if inp.noise is not None else logits
    tokens, parents = inp.tokens.contiguous(), inp.parents.contiguous()
    f32, i64, i32 = torch.float32, torch.int64, torch.int32

    part = torch.empty((R, C, 8), dtype=f32, device=dev)
    pidx = torch.empty((R, C), dtype=i32, device=dev)
    row_stats_kernel[(B, T, C)](
        logits, logits.stride(0), q, q.stride(0), inp.num_nodes, inp.num_nodes, inp.temperature, part, pidx,
        V, T, C, plan.tiles_per_chunk, TREE=True, HAS_Q=has_q, BLOCK_V=plan.block_v, num_warps=plan.num_warps)

    rows = {k: torch.empty(R, dtype=f32, device=dev) for k in ("m", "lz", "h", "hq", "kl")}
    path = torch.empty((B, W), dtype=i64, device=dev)
    emitted = torch.empty((B, W), dtype=i64, device=dev)
    n_acc = torch.empty(B, dtype=i64, device=dev)
    error = torch.empty(B, dtype=torch.bool, device=dev)
    draw = {k: torch.empty(B, dtype=i64, device=dev) for k in ("row", "qrow", "pos")}
    draw_kind = torch.empty(B, dtype=i32, device=dev)
    HB = triton.next_power_of_2(max(1, inp.max_children))
    hist_tok = torch.empty((B, HB), dtype=i64, device=dev)
    hist_f = torch.empty((B, HB, 2), dtype=f32, device=dev)
    hist_meta = torch.empty((B, 2), dtype=i32, device=dev)
    req_stats = {k: torch.empty(B, dtype=f32, device=dev) for k in ("entropy_p_last", "p_emitted", "q_emitted")}
    tree_walk_kernel[(B,)](
        logits, logits.stride(0), q, q.stride(0), tokens, parents, inp.num_nodes, inp.temperature, inp.seeds,
        inp.positions, u, part, pidx, C, T, V, inp.dmax, W,
        rows["m"], rows["lz"], rows["h"], rows["hq"], rows["kl"], path, emitted, n_acc, error,
        draw["row"], draw["qrow"], draw_kind, draw["pos"], hist_tok, hist_f, hist_meta, *req_stats.values(),
        C_BLOCK=plan.c_block, W_BLOCK=triton.next_power_of_2(W), HB=HB, BLOCK_V=plan.block_v,
        HAS_Q=has_q, HAS_U=inp.uniforms is not None, num_warps=plan.num_warps if has_q else 1)

    # The draw pass reads one row per request (plus every row for sum min(p, q) when q is given).
    dplan = plan if has_q else make_plan(B, V, dev, block_v, chunks)
    C = dplan.chunks
    dpart = torch.empty((B, C, 2), dtype=f32, device=dev)
    didx = torch.empty((B, C, 2), dtype=i32, device=dev)
    apart = torch.empty((R, C), dtype=f32, device=dev) if has_q else dpart
    draw_kernel[(B, T if has_q else 1, C)](
        logits, logits.stride(0), q, q.stride(0), noise, noise.stride(0),
        inp.num_nodes, inp.num_nodes, inp.temperature, inp.seeds,
        draw["row"], draw["qrow"], draw_kind, draw["pos"], rows["m"], rows["lz"],
        hist_tok, hist_f, hist_meta, dpart, didx, apart,
        V, T, C, dplan.tiles_per_chunk,
        TREE=True, HAS_Q=has_q, HAS_NOISE=inp.noise is not None, HB=HB, BLOCK_V=dplan.block_v,
        num_warps=dplan.num_warps)

    node_stats = {k: torch.empty((B, T), dtype=f32, device=dev)
                  for k in ("p_draft", "q_draft", "alpha", "entropy_p", "entropy_q", "kl")}
    tree_finish_kernel[(B,)](
        logits, logits.stride(0), q, q.stride(0), tokens, parents, inp.num_nodes, inp.temperature,
        draw["row"], draw_kind, rows["m"], rows["lz"], rows["h"], rows["hq"], rows["kl"],
        hist_tok, hist_meta, dpart, didx, apart, C, T, W,
        emitted, n_acc, error, req_stats["p_emitted"], req_stats["q_emitted"], *node_stats.values(),
        C_BLOCK=dplan.c_block, T_BLOCK=triton.next_power_of_2(T), HB=HB, HAS_Q=has_q, num_warps=1)

    return TreeResult(path, emitted, n_acc, error, node_stats | req_stats)
