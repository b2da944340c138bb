"""Float64 PyTorch references for chain and tree verification.

Vocabulary (used across spec_kernels): p = the target's distribution softmax(logits / t_eff) at a row,
q = the drafter's distribution the draft was drawn from (one-hot when draft_probs is None). A draft
is accepted, or rejected and replaced by a recovered token drawn from the residual
normalise(max(0, p - q)); when every draft is accepted the last row gives a bonus token drawn from p.
t_eff = T for sampling and 1.0 for greedy requests (T = 0); every statistic uses t_eff.

These functions define the semantics; the Triton kernels compute the same thing in float32 with the
same counter-based randomness (rng.py), so both give identical tokens (barring float32/float64
rounding on a near-tie, which the tests never meet) and statistics equal to float32 accuracy.
"""

from __future__ import annotations

import torch

from . import rng
from .checks import ChainInputs, TreeInputs
from .results import DRAFT_STATS, ChainResult, TreeResult

F64 = torch.float64
NAN = float("nan")


def _row_stats(raw: torch.Tensor, t_row: torch.Tensor):
    """raw [R, V] float64 logits, t_row [R] -> logp, p [R, V]; entropy, argmax, bad [R]."""
    bad = _bad_rows(raw)
    x = raw / t_row[:, None]
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    return logp, p, entropy, x.argmax(-1), bad


def _q_stats(p: torch.Tensor, logp: torch.Tensor, q: torch.Tensor):
    """p, logp, q [R, V] float64 -> alpha, entropy_q, kl [R]."""
    alpha = torch.minimum(p, q).sum(-1)
    entropy_q = -torch.where(q > 0, q * torch.log(q), 0.0).sum(-1)
    kl = torch.where(p > 0, p * (logp - torch.log(q)), 0.0).sum(-1)
    return alpha, entropy_q, kl


def _f32(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) for k, v in stats.items()}


def _bad_rows(raw: torch.Tensor) -> torch.Tensor:
    """[R, V] logits -> [R] bool: a NaN or +inf, or no finite entry."""
    return (torch.isnan(raw) | (raw == float("inf"))).any(-1) | ~(raw.amax(-1) > float("-inf"))


def verify_chain_reference(inp: ChainInputs, stats: bool = True) -> ChainResult:
    dev = inp.logits.device
    B, N, V, K = inp.B, inp.N, inp.V, inp.kmax
    ar_b = torch.arange(B, device=dev)
    counts = inp.cu[1:] - inp.cu[:-1]  # [B]
    req_of_row = torch.repeat_interleave(ar_b, counts + 1, output_size=N + B)  # [N + B]
    req_of_draft = torch.repeat_interleave(ar_b, counts, output_size=N)  # [N]
    draft_row = torch.arange(N, device=dev) + req_of_draft  # [N] row that judges draft i
    j_of_draft = torch.arange(N, device=dev) - inp.cu[:-1][req_of_draft]  # [N] position in its chain
    greedy = inp.temperature == 0  # [B]
    # A batch that is all greedy draws nothing, and without statistics needs no probabilities: argmax
    # comparisons only. (This reference runs on the host, where reading `all_greedy` costs nothing.)
    all_greedy = bool(greedy.all())
    if all_greedy and not stats:
        amax = inp.logits.argmax(-1)  # [N + B]: the argmax of the float64 copy too (the conversion is exact)
        error = torch.zeros(B, device=dev).index_add_(0, req_of_row, _bad_rows(inp.logits).float()) > 0
        num_accepted, final_row, _, _ = _accepted(inp, inp.draft_ids == amax[draft_row], error, counts,
                                                  req_of_draft, j_of_draft)
        emitted = _emitted(inp, num_accepted, amax[final_row], error, req_of_draft, j_of_draft)
        return ChainResult(emitted, num_accepted, error, {})
    t_eff = torch.where(greedy, 1.0, inp.temperature.to(F64))  # [B]

    logp, p, entropy, amax, bad = _row_stats(inp.logits.to(F64), t_eff[req_of_row])  # [R, V] / [R]
    error = torch.zeros(B, dtype=F64, device=dev).index_add_(0, req_of_row, bad.to(F64)) > 0  # [B]

    xd = inp.draft_ids  # [N]
    p_draft = p[draft_row, xd]
    if inp.draft_probs is None:
        q = None
        q_draft = torch.ones_like(p_draft)
        alpha, entropy_q, kl = p_draft.clone(), torch.zeros_like(p_draft), torch.full_like(p_draft, NAN)
    else:
        q = inp.draft_probs.to(F64)  # [N, V]
        q_draft = q[torch.arange(N, device=dev), xd]
        alpha, entropy_q, kl = _q_stats(p[draft_row], logp[draft_row], q)

    # Accept tests: greedy compares with the argmax, sampling tests u * q(x) < p(x).
    if all_greedy:
        accept = xd == amax[draft_row]  # [N]
    else:
        if inp.uniforms is not None:
            u = inp.uniforms.to(F64)
        else:
            u = rng.uniform(inp.seeds[req_of_draft], inp.positions[req_of_draft] + j_of_draft, xd, rng.STREAM_ACCEPT)
        accept = torch.where(greedy[req_of_draft], xd == amax[draft_row], u * q_draft < p_draft)  # [N]
    num_accepted, final_row, recovered, rej = _accepted(inp, accept, error, counts, req_of_draft, j_of_draft)

    # Draws: Gumbel-max over log(weights) + g.
    if all_greedy:
        token = amax[final_row]  # [B]
    else:
        if inp.noise is not None:
            g = inp.noise.to(F64)[final_row]  # [B, V]
        else:
            g = rng.gumbel_rows(inp.seeds, inp.positions + num_accepted, V)
        lp = logp[final_row]  # [B, V]
        bonus_score = lp + g
        if N:
            if q is None:
                log_w = lp.clone()
                log_w[ar_b, xd[rej]] = float("-inf")  # max(0, p - onehot(x)) is 0 at x
            else:
                log_w = torch.log(torch.clamp(p[final_row] - q[rej], min=0.0))
            all_zero = ~(log_w.amax(-1) > float("-inf"))  # residual is all zero: fall back to p
            residual_score = torch.where(all_zero[:, None], bonus_score, log_w + g)
            sampled = torch.where(recovered, residual_score.argmax(-1), bonus_score.argmax(-1))
        else:
            sampled = bonus_score.argmax(-1)
        token = torch.where(greedy, amax[final_row], sampled)  # [B]
    emitted = _emitted(inp, num_accepted, token, error, req_of_draft, j_of_draft)

    if N:
        q_tok = q[rej, token] if q is not None else (token == xd[rej]).to(F64)
    else:
        q_tok = torch.zeros(B, dtype=F64, device=dev)
    q_emitted = torch.where(recovered, q_tok, NAN)
    request = {
        "entropy_p_last": entropy[final_row],
        "p_emitted": p[final_row, token],
        "q_emitted": q_emitted,
    }
    request = {k: torch.where(error, NAN, v) for k, v in request.items()}
    draft_err = error[req_of_draft]
    draft = dict(zip(DRAFT_STATS, (p_draft, q_draft, alpha, entropy[draft_row], entropy_q, kl)))
    draft = {k: torch.where(draft_err, NAN, v) for k, v in draft.items()}
    return ChainResult(emitted, num_accepted, error, _f32(draft | request))


def _accepted(inp: ChainInputs, accept, error, counts, req_of_draft, j_of_draft):
    """accept [N] per draft -> num_accepted [B] (the leading run), final_row [B] (the rejected draft's row
    or the bonus row), recovered [B] (a draft was rejected), rej [B] (the rejected draft's index)."""
    B, N, K, dev = inp.B, inp.N, inp.kmax, inp.logits.device
    accept_pad = torch.zeros((B, K), dtype=torch.int64, device=dev)
    accept_pad[req_of_draft, j_of_draft] = accept.long()
    num_accepted = accept_pad.cumprod(1).sum(1) if K else torch.zeros(B, dtype=torch.int64, device=dev)
    num_accepted = torch.where(error, 0, num_accepted)  # [B]
    final_row = inp.cu[:-1] + torch.arange(B, device=dev) + num_accepted
    recovered = num_accepted < counts
    rej = (inp.cu[:-1] + num_accepted).clamp(max=max(N - 1, 0))
    return num_accepted, final_row, recovered, rej


def _emitted(inp: ChainInputs, num_accepted, token, error, req_of_draft, j_of_draft) -> torch.Tensor:
    """[B, K + 1]: the accepted drafts, then the recovered or bonus token, -1 after (all -1 on error)."""
    B, K, dev = inp.B, inp.kmax, inp.logits.device
    cols = torch.arange(K + 1, device=dev)
    drafts_pad = torch.full((B, K + 1), -1, dtype=torch.int64, device=dev)
    drafts_pad[req_of_draft, j_of_draft] = inp.draft_ids
    emitted = torch.where(cols[None, :] < num_accepted[:, None], drafts_pad, -1)
    emitted[torch.arange(B, device=dev), num_accepted] = token
    emitted[error] = -1
    return emitted


def verify_tree_reference(inp: TreeInputs, stats: bool = True) -> TreeResult:
    dev = inp.logits.device
    B, T, V, D = inp.B, inp.T, inp.V, inp.dmax
    greedy = inp.temperature == 0
    all_greedy = bool(greedy.all())  # (a host read: free where this reference runs)
    lean = all_greedy and not stats  # argmax comparisons only: no probabilities, no statistics
    if lean:
        amax, bad = inp.logits.argmax(-1), _bad_rows(inp.logits.reshape(B * T, V)).view(B, T)  # [B, T]
        p = q = None
    else:
        t_eff = torch.where(greedy, 1.0, inp.temperature.to(F64))
        logp, p, entropy, amax, bad = _row_stats(inp.logits.to(F64).reshape(B * T, V), t_eff.repeat_interleave(T))
        logp, p = logp.view(B, T, V), p.view(B, T, V)
        entropy, amax, bad = entropy.view(B, T), amax.view(B, T), bad.view(B, T)
        q = inp.draft_probs.to(F64) if inp.draft_probs is not None else None
    nodes = torch.arange(T, device=dev)
    valid = nodes[None, :] < inp.num_nodes[:, None]  # [B, T]
    error = (bad & valid).any(1)  # [B]
    if not lean:
        draft = _tree_draft_stats(inp, p, logp, q, entropy, valid, error)

    # The walk, all requests together: one step per depth, children tried in index order.
    ar = torch.arange(B, device=dev)
    node = torch.zeros(B, dtype=torch.int64, device=dev)
    depth = torch.zeros(B, dtype=torch.int64, device=dev)
    alive = ~error
    path = torch.full((B, D + 1), -1, dtype=torch.int64, device=dev)
    path[:, 0] = 0
    emitted = torch.full((B, D + 1), -1, dtype=torch.int64, device=dev)
    final_r = None if all_greedy else torch.zeros((B, V), dtype=F64, device=dev)  # residual at the final node
    final_kids = torch.zeros((B, V), dtype=torch.bool, device=dev)  # tokens of the final node's children
    has_kids = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(D + 1):
        if not bool(alive.any()):
            break
        try_children = _greedy_children if all_greedy else _try_children
        r, kid_tok, chosen, n_kids = try_children(inp, node, depth, alive, valid, p, amax, q)
        done = alive & (chosen < 0)
        if final_r is not None:
            final_r[done] = r[done]
        final_kids[done], has_kids[done] = kid_tok[done], n_kids[done] > 0
        step = alive & (chosen >= 0)
        depth = depth + step.long()
        rows = ar[step]
        path[rows, depth[step]] = chosen[step]
        emitted[rows, depth[step] - 1] = inp.tokens[rows, chosen[step]]
        node = torch.where(step, chosen, node)
        alive = step
    return _tree_finish(inp, lean, all_greedy, greedy, path, emitted, node, depth, error, amax, p,
                        None if lean else logp, q, None if lean else entropy, final_r, final_kids, has_kids,
                        None if lean else draft)


def _tree_draft_stats(inp: TreeInputs, p, logp, q, entropy, valid, error) -> dict:
    """Per-node statistics: node n's token judged under its parent's row."""
    B, T, V = p.shape
    dev = p.device
    nodes = torch.arange(T, device=dev)
    is_draft = valid & (nodes[None, :] > 0)
    par = torch.where(is_draft, inp.parents, 0)  # [B, T]
    tok = torch.where(is_draft, inp.tokens, 0)
    bi = torch.arange(B, device=dev)[:, None]
    p_draft = p[bi, par, tok]
    if q is None:
        q_draft = torch.ones_like(p_draft)
        alpha, entropy_q, kl = p_draft.clone(), torch.zeros_like(p_draft), torch.full_like(p_draft, NAN)
    else:
        q_draft = q[bi, par, tok]
        alpha_r, entropy_q_r, kl_r = (s.view(B, T) for s in _q_stats(p.view(-1, V), logp.view(-1, V), q.view(-1, V)))
        alpha, entropy_q, kl = alpha_r.gather(1, par), entropy_q_r.gather(1, par), kl_r.gather(1, par)
    keep = is_draft & ~error[:, None]
    draft = dict(zip(DRAFT_STATS, (p_draft, q_draft, alpha, entropy.gather(1, par), entropy_q, kl)))
    return {k: torch.where(keep, v, NAN) for k, v in draft.items()}


def _tree_finish(inp: TreeInputs, lean, all_greedy, greedy, path, emitted, node, depth, error, amax, p, logp, q,
                 entropy, final_r, final_kids, has_kids, draft) -> TreeResult:
    """The final token (argmax when greedy, the residual draw when the final node's children were all
    rejected, the bonus draw at a leaf) and the request statistics."""
    B, V = inp.B, inp.V
    ar = torch.arange(B, device=inp.logits.device)
    # Final token: argmax (greedy), residual draw (children all rejected) or bonus draw (leaf).
    if all_greedy:
        token = amax[ar, node]
    else:
        g = inp.noise.to(F64)[ar, node] if inp.noise is not None else rng.gumbel_rows(inp.seeds, inp.positions + depth, V)
        lp = logp[ar, node]  # [B, V]
        log_r = torch.log(final_r)
        log_r = torch.where(log_r.amax(-1, keepdim=True) > float("-inf"), log_r, lp)  # all-zero residual: p
        score = torch.where(has_kids[:, None], log_r, lp) + g
        token = torch.where(greedy, amax[ar, node], score.argmax(-1))
    token = torch.where(error, -1, token)
    emitted[ar[~error], depth[~error]] = token[~error]
    num_accepted = torch.where(error, 0, depth)
    if lean:
        return TreeResult(path, emitted, num_accepted, error, {})
    tok = token.clamp(min=0)
    if q is not None:
        q_tok = q[ar, node, tok]
    else:
        q_tok = final_kids[ar, tok].to(F64)
    last = {
        "entropy_p_last": entropy[ar, node],
        "p_emitted": p[ar, node, tok],
        "q_emitted": torch.where(has_kids, q_tok, NAN),
    }
    last = {k: torch.where(error, NAN, v) for k, v in last.items()}
    return TreeResult(path, emitted, num_accepted, error, _f32(draft | last))


def _greedy_children(inp: TreeInputs, node, depth, alive, valid, p, amax, q):
    """_try_children when every request is greedy, all children at once: the accepted child is the first
    (in index order) whose token is the argmax of the node's row; siblings are distinct tokens, so at
    most one matches. No residual is needed (the final token is an argmax too): r is None. Same
    children's token mask and counts as _try_children; p and q are not read."""
    B, T = inp.tokens.shape
    V, dev = inp.V, inp.tokens.device
    ar = torch.arange(B, device=dev)
    nodes = torch.arange(T, device=dev)
    kids = alive[:, None] & valid & (nodes[None, :] > 0) & (inp.parents == node[:, None])  # [B, T]
    match = kids & (inp.tokens == amax[ar, node][:, None])
    first = torch.where(match, nodes[None, :], T).amin(1)  # [B]
    chosen = torch.where(first < T, first, -1)
    tried = kids & (nodes[None, :] <= torch.where(chosen >= 0, chosen, T)[:, None])  # up to the accepted one
    kid_tok = torch.zeros((B, V), dtype=torch.bool, device=dev)
    bi, ci = tried.nonzero(as_tuple=True)
    kid_tok[bi, inp.tokens[bi, ci]] = True
    return None, kid_tok, chosen, tried.sum(1)


def _try_children(inp: TreeInputs, node, depth, alive, valid, p, amax, q):
    """Try the children of each alive request's current node in index order.

    Returns the residual r [B, V] after the rejections, the children's tokens as a mask [B, V], the
    accepted child (-1: none) and the number of children tried, [B] each.
    SpecInfer / EAGLE-2 rule (recursive rejection sampling without replacement): child x is accepted
    with probability min(1, r(x) / q'(x)), where q' = q with the tokens of the already-rejected siblings
    zeroed, divided by D = the sum of q over the tokens not yet drawn (summed directly: 1 - the drawn
    mass cancels to 0 when q is peaked). q'(x) = 0 (x already drawn, q(x) = 0, or D = 0) rejects x.
    One-hot drafter: q' = onehot(x). After a rejection r <- normalise(max(0, r - q')), or p when that
    is all zero.
    """
    B, T, V = p.shape
    ar = torch.arange(B, device=p.device)
    rows = p[ar, node]  # [B, V]
    r = rows.clone()
    q_rows = q[ar, node] if q is not None else None
    zeroed = torch.zeros((B, V), dtype=torch.bool, device=p.device)  # rejected tokens (for q')
    kid_tok = torch.zeros((B, V), dtype=torch.bool, device=p.device)
    chosen = torch.full((B,), -1, dtype=torch.int64, device=p.device)
    n_kids = torch.zeros(B, dtype=torch.int64, device=p.device)
    greedy = inp.temperature == 0
    for c in range(1, T):
        kid = alive & (chosen < 0) & valid[:, c] & (inp.parents[:, c] == node)
        idx = ar[kid]
        if idx.numel() == 0:
            continue
        n_kids[idx] += 1
        x = inp.tokens[idx, c]
        kid_tok[idx, x] = True
        if q is None:
            q_prime = torch.nn.functional.one_hot(x, V).to(F64)  # [n, V]
        else:
            undrawn = torch.where(zeroed[idx], 0.0, q_rows[idx])  # [n, V]
            mass = undrawn.sum(-1, keepdim=True)  # D: q mass of the tokens not yet drawn
            q_prime = torch.where(mass > 0, undrawn / torch.where(mass > 0, mass, 1.0), 0.0)
        if inp.uniforms is not None:
            u = inp.uniforms[idx, c].to(F64)
        else:
            u = rng.uniform(inp.seeds[idx], inp.positions[idx] + depth[idx], x, rng.STREAM_ACCEPT)
        n = torch.arange(idx.numel(), device=p.device)
        qx = q_prime[n, x]
        accept = torch.where(greedy[idx], x == amax[idx, node[idx]], (qx > 0) & (u * qx < r[idx, x]))
        chosen[idx[accept]] = c
        rej = ~accept & ~greedy[idx]
        if bool(rej.any()):
            ri, xr = idx[rej], x[rej]
            w = torch.clamp(r[ri] - q_prime[rej], min=0.0)
            total = w.sum(-1, keepdim=True)
            r[ri] = torch.where(total > 0, w / torch.where(total > 0, total, 1.0), rows[ri])
            if q is not None:
                zeroed[ri, xr] = True
    return r, kid_tok, chosen, n_kids
