"""Triton passes over vocabulary rows, shared by chain and tree verification.

A "row" is one target distribution: chain request b owns rows cu[b]+b .. cu[b+1]+b (K_b + 1 rows),
tree request b owns rows b*T .. b*T + num_nodes[b] - 1. The vocabulary of a row is cut into C chunks
of `tiles_per_chunk` tiles of BLOCK_V entries, so that few rows with a large V still fill the GPU.

row_stats_kernel   grid (B, rows per request, C): one read of the logits (and q) per chunk giving an
                   online max / normaliser / entropy accumulator, the argmax, a non-finite flag and
                   the q statistics: 8 floats + 1 index per (row, chunk). Nothing of size V is written.
combine_row        folds the C chunk partials of one row (used by the per-request decision kernels).
draw_kernel        second read, only where needed: the Gumbel-max draw of the recovered or bonus
                   token (one row per request) and, with a drafter distribution q, sum_v min(p, q).

Partial layout, per (row, chunk): [m, z, s1, best, bad, sum q log q, sum e log q, sum q] where
x = logit / t_eff, m = max x (-inf for a chunk that is all masked), e = exp(x - m), z = sum e,
s1 = sum e * (x - m).
"""

import triton
import triton.language as tl

from .triton_rng import row_key, token_uniform


@triton.jit
def request_rows(b, cu_ptr, nn_ptr, T, TREE: tl.constexpr):
    """(first row, number of rows, first q row, number of q rows) of request b."""
    if TREE:
        base = b.to(tl.int64) * T
        n = tl.load(nn_ptr + b)
        qbase = base
        n_q = n
    else:
        start = tl.load(cu_ptr + b)
        end = tl.load(cu_ptr + b + 1)
        base = start + b
        n = end - start + 1
        qbase = start
        n_q = end - start
    return base, n, qbase, n_q


@triton.jit
def inverse_temperature(temp_ptr, b):
    t = tl.load(temp_ptr + b)
    return tl.where(t > 0, 1.0 / tl.where(t > 0, t, 1.0), 1.0)


@triton.jit
def row_stats_kernel(
    logits_ptr, stride_l, q_ptr, stride_q, cu_ptr, nn_ptr, temp_ptr,
    part_ptr, pidx_ptr,  # [R, C, 8] float32, [R, C] int32
    V, T, C, tiles_per_chunk,
    TREE: tl.constexpr, HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    c = tl.program_id(2)
    base, n_rows, qbase, n_q = request_rows(b, cu_ptr, nn_ptr, T, TREE)
    active = j < n_rows
    row = base + j
    has_q = j < n_q
    inv_t = inverse_temperature(temp_ptr, b)
    v0 = c * tiles_per_chunk * BLOCK_V
    n_tiles = tl.where(active, tiles_per_chunk, 0)
    row_ptr = logits_ptr + row * stride_l
    q_row_ptr = q_ptr + (qbase + j) * stride_q
    v_q = tl.where(has_q, V, 0)  # q entries to read (scalar bounds keep masks plain blocks)

    # The running max m is a scalar (one reduction per tile, which also gives the argmax); the sums
    # are per-lane vectors rescaled by exp(m_old - m_new) and reduced once at the end.
    m = tl.full([], float("-inf"), tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.zeros([], tl.int32)
    z = tl.zeros([BLOCK_V], tl.float32)
    s1 = tl.zeros([BLOCK_V], tl.float32)
    bad = tl.zeros([BLOCK_V], tl.int32)
    hq = tl.zeros([BLOCK_V], tl.float32)
    spq = tl.zeros([BLOCK_V], tl.float32)
    qsum = tl.zeros([BLOCK_V], tl.float32)
    for t in range(0, n_tiles):
        offs = v0 + t * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = offs < V
        raw = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        bad = bad | ((raw != raw) | (raw == float("inf"))).to(tl.int32)
        x = raw * inv_t
        tmax, targ = tl.max(x, 0, return_indices=True)
        better = tmax > best
        best_idx = tl.where(better, v0 + t * BLOCK_V + targ, best_idx)
        best = tl.where(better, tmax, best)
        m_new = tl.maximum(m, tmax)
        ms = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - ms)
        shift = tl.where(m == float("-inf"), 0.0, m - ms)
        e = tl.exp(x - ms)
        s1 = scale * (s1 + shift * z) + tl.where(e > 0, e * (x - ms), 0.0)
        z = z * scale + e
        if HAS_Q:
            qv = tl.load(q_row_ptr + offs, mask=offs < v_q, other=0.0).to(tl.float32)
            hq += tl.where(qv > 0, qv * tl.log(qv), 0.0)
            qsum += qv
            spq = tl.where(spq == float("-inf"), spq, spq * scale) + tl.where(e > 0, e * tl.log(qv), 0.0)
        m = m_new

    out = part_ptr + (row * C + c) * 8
    tl.store(out + 0, m, mask=active)
    tl.store(out + 1, tl.sum(z, 0), mask=active)
    tl.store(out + 2, tl.sum(s1, 0), mask=active)
    tl.store(out + 3, best, mask=active)
    tl.store(out + 4, tl.max(bad, 0).to(tl.float32), mask=active)
    tl.store(out + 5, tl.sum(hq, 0), mask=active)
    tl.store(out + 6, tl.sum(spq, 0), mask=active)
    tl.store(out + 7, tl.sum(qsum, 0), mask=active)
    tl.store(pidx_ptr + row * C + c, best_idx, mask=active)


@triton.jit
def combine_row(part_ptr, pidx_ptr, row, C, C_BLOCK: tl.constexpr, HAS_Q: tl.constexpr):
    """Fold the C chunk partials of one row.

    Returns (m, log z, entropy, argmax, max x, bad, entropy of q, KL(p || q)) where
    log p(v) = x_v - m - log z.
    """
    cs = tl.arange(0, C_BLOCK)
    cm = cs < C
    src = part_ptr + (row * C + cs) * 8
    mc = tl.load(src + 0, mask=cm, other=float("-inf"))
    zc = tl.load(src + 1, mask=cm, other=0.0)
    s1c = tl.load(src + 2, mask=cm, other=0.0)
    bc = tl.load(src + 3, mask=cm, other=float("-inf"))
    badc = tl.load(src + 4, mask=cm, other=0.0)
    m_max = tl.max(mc, 0)
    m = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(mc - m)
    shift = tl.where(mc == float("-inf"), 0.0, mc - m)
    z = tl.sum(zc * w, 0)
    s1 = tl.sum(w * (s1c + shift * zc), 0)
    log_z = tl.log(z)
    entropy = log_z - s1 / z
    best, best_c = tl.max(bc, 0, return_indices=True)
    argmax = tl.load(pidx_ptr + row * C + best_c)
    bad = (tl.max(badc, 0) > 0) | (m_max == float("-inf"))  # non-finite, or every token masked
    if HAS_Q:
        hqc = tl.load(src + 5, mask=cm, other=0.0)
        spqc = tl.load(src + 6, mask=cm, other=0.0)
        entropy_q = -tl.sum(hqc, 0)
        spq = tl.sum(tl.where(spqc == float("-inf"), float("-inf"), w * spqc), 0)
        kl = -entropy - spq / z
    else:
        entropy_q = tl.zeros([], tl.float32)
        kl = tl.full([], float("nan"), tl.float32)
    return m, log_z, entropy, argmax, best, bad, entropy_q, kl


@triton.jit
def row_q_sum(part_ptr, row, C, C_BLOCK: tl.constexpr):
    """sum_v q(v) of one row, folded from its chunk partials (slot 7; HAS_Q rows only)."""
    cs = tl.arange(0, C_BLOCK)
    return tl.sum(tl.load(part_ptr + (row * C + cs) * 8 + 7, mask=cs < C, other=0.0), 0)


@triton.jit
def hist_entry(hs, vec, h):
    """Scalar vec[h] from a small register vector indexed by hs."""
    return tl.sum(tl.where(hs == h, vec, 0), 0)


@triton.jit
def draw_kernel(
    logits_ptr, stride_l, q_ptr, stride_q, noise_ptr, stride_n,
    cu_ptr, nn_ptr, temp_ptr, seed_ptr,
    draw_row_ptr, draw_qrow_ptr, draw_kind_ptr, draw_pos_ptr,  # [B]: row, q row, 0 none / 1 residual / 2 bonus
    row_m_ptr, row_lz_ptr,  # [R]
    hist_tok_ptr, hist_f_ptr, hist_meta_ptr,  # [B, HB] int64, [B, HB, 2] float32 (D, S), [B, 2] int32 (len, start)
    dpart_ptr, didx_ptr,  # [B, C, 2] float32 / int32: best (residual, p) Gumbel score and its token
    apart_ptr,  # [R, C] float32: sum_v min(p, q) partials (HAS_Q)
    V, T, C, tiles_per_chunk,
    TREE: tl.constexpr, HAS_Q: tl.constexpr, HAS_NOISE: tl.constexpr, HB: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Gumbel-max draws of the recovered / bonus token, and the alpha partials when q is given.

    One-hot drafter: grid (B, 1, C), the program reads the draw row of request b; the residual is p
    with the rejected drafted tokens (since the last fall-back) removed.
    With q: grid (B, rows per request, C); every row with a q row gets its sum min(p, q) partial and
    the draw row also draws from the residual, rebuilt from the rejection history:
        r_0 = p;  q'_h = q with tokens t_0..t_{h-1} zeroed, / D_h;  r_{h+1} = max(0, r_h - q'_h) / S_{h+1}
        (D_h = the sum of q over the tokens other than t_0..t_{h-1}, as the walk computed it)
        (r_{h+1} = p when S_{h+1} = 0). The draw uses max(0, r_{k-1} - q'_{k-1}), unnormalised.
    Each program keeps the best score of the residual and of p (the fall-back when the residual is 0).
    """
    b = tl.program_id(0)
    j = tl.program_id(1)
    c = tl.program_id(2)
    kind = tl.load(draw_kind_ptr + b)
    draw_row = tl.load(draw_row_ptr + b)
    if HAS_Q:
        base, n_rows, qbase, n_q = request_rows(b, cu_ptr, nn_ptr, T, TREE)
        row = base + j
        q_row = qbase + j
        need_alpha = j < n_q
        is_draw = (kind > 0) & (row == draw_row) & (j < n_rows)
    else:
        row = draw_row
        q_row = draw_row
        need_alpha = j < 0
        is_draw = kind > 0
    busy = is_draw | need_alpha
    v_q = tl.where(need_alpha, V, 0)
    n_tiles = tl.where(busy, tiles_per_chunk, 0)
    inv_t = inverse_temperature(temp_ptr, b)
    m = tl.load(row_m_ptr + row, mask=busy, other=0.0)
    log_z = tl.load(row_lz_ptr + row, mask=busy, other=0.0)
    key = row_key(tl.load(seed_ptr + b), tl.load(draw_pos_ptr + b), 1)
    hs = tl.arange(0, HB)
    h_len = tl.where(kind == 1, tl.load(hist_meta_ptr + b * 2), 0)
    h_start = tl.load(hist_meta_ptr + b * 2 + 1)
    h_tok = tl.load(hist_tok_ptr + b * HB + hs, mask=hs < h_len, other=-1)
    h_d = tl.load(hist_f_ptr + (b * HB + hs) * 2, mask=hs < h_len, other=1.0)
    h_s = tl.load(hist_f_ptr + (b * HB + hs) * 2 + 1, mask=hs < h_len, other=1.0)
    row_ptr = logits_ptr + row * stride_l
    q_row_ptr = q_ptr + q_row * stride_q
    noise_row_ptr = noise_ptr + row * stride_n
    v0 = c * tiles_per_chunk * BLOCK_V

    # Per-lane running winners, reduced once at the end (ties: lowest token).
    alpha = tl.zeros([BLOCK_V], tl.float32)
    best_r = tl.full([BLOCK_V], float("-inf"), tl.float32)
    idx_r = tl.zeros([BLOCK_V], tl.int32)
    best_p = tl.full([BLOCK_V], float("-inf"), tl.float32)
    idx_p = tl.zeros([BLOCK_V], tl.int32)
    for t in range(0, n_tiles):
        offs = v0 + t * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.zeros([BLOCK_V], tl.float32)
        qv = tl.zeros([BLOCK_V], tl.float32)
        if HAS_Q:
            p = tl.exp(x - m - log_z)
            qv = tl.load(q_row_ptr + offs, mask=offs < v_q, other=0.0).to(tl.float32)
            alpha += tl.minimum(p, qv)
        if is_draw:
            if HAS_NOISE:
                g = tl.load(noise_row_ptr + offs, mask=mask, other=0.0)
            else:
                g = -tl.log(-tl.log(token_uniform(key, offs)))
            score_p = x + g
            if HAS_Q:
                r = p
                zeroed = offs < 0
                for h in range(0, h_len - 1):
                    d_h = hist_entry(hs, h_d, h)
                    s_h = hist_entry(hs, h_s, h)
                    q_h = tl.where(zeroed, 0.0, qv * tl.where(d_h > 0, 1.0 / tl.where(d_h > 0, d_h, 1.0), 0.0))
                    w = tl.maximum(r - q_h, 0.0)
                    r = tl.where(s_h > 0, w / tl.where(s_h > 0, s_h, 1.0), p)
                    zeroed = zeroed | (offs == hist_entry(hs, h_tok, h))
                d_last = hist_entry(hs, h_d, h_len - 1)
                q_last = tl.where(zeroed, 0.0, qv * tl.where(d_last > 0, 1.0 / tl.where(d_last > 0, d_last, 1.0), 0.0))
                w = tl.maximum(r - q_last, 0.0)
                score_r = tl.where(w > 0, tl.log(w), float("-inf")) + g
            else:
                excluded = offs < 0
                for h in range(h_start, h_len):
                    excluded = excluded | (offs == hist_entry(hs, h_tok, h))
                score_r = tl.where(excluded, float("-inf"), score_p)
            better_r = score_r > best_r
            idx_r = tl.where(better_r, offs, idx_r)
            best_r = tl.where(better_r, score_r, best_r)
            better_p = score_p > best_p
            idx_p = tl.where(better_p, offs, idx_p)
            best_p = tl.where(better_p, score_p, best_p)

    if HAS_Q:
        tl.store(apart_ptr + row * C + c, tl.sum(alpha, 0), mask=need_alpha)
    out = (b * C + c) * 2
    top_r = tl.max(best_r, 0)
    top_p = tl.max(best_p, 0)
    tl.store(dpart_ptr + out, top_r, mask=is_draw)
    tl.store(dpart_ptr + out + 1, top_p, mask=is_draw)
    tl.store(didx_ptr + out, tl.min(tl.where(best_r == top_r, idx_r, V), 0), mask=is_draw)
    tl.store(didx_ptr + out + 1, tl.min(tl.where(best_p == top_p, idx_p, V), 0), mask=is_draw)


@triton.jit
def finish_draw(dpart_ptr, didx_ptr, b, C, kind, C_BLOCK: tl.constexpr):
    """Token drawn for request b: the residual winner, or the p winner for a bonus draw or an all-zero
    residual."""
    cs = tl.arange(0, C_BLOCK)
    cm = cs < tl.where(kind > 0, C, 0)
    src = (b * C + cs) * 2
    sr = tl.load(dpart_ptr + src, mask=cm, other=float("-inf"))
    sp = tl.load(dpart_ptr + src + 1, mask=cm, other=float("-inf"))
    br, cr = tl.max(sr, 0, return_indices=True)
    bp, cp = tl.max(sp, 0, return_indices=True)
    tok_r = tl.load(didx_ptr + (b * C + cr) * 2, mask=kind > 0, other=0)
    tok_p = tl.load(didx_ptr + (b * C + cp) * 2 + 1, mask=kind > 0, other=0)
    return tl.where((kind == 2) | (br == float("-inf")), tok_p, tok_r)
