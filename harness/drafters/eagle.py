"""`eagle` and `eagle3`: a trained head (harness.drafters.heads) drafts from the target's own hidden states.

Chains (the default on a CPU, or `--total-tokens 0`): the head unrolls K = --k steps, feeding back its
own output as the next feature; q = softmax(head logits / T) (T = 1 when greedy).

EAGLE-2 dynamic trees (the default on CUDA, or any of `--depth D --top-k k --total-tokens N`; see
DEFAULT_SHAPE for the defaults and what was measured): the root's k best children
form depth 1; at each depth the head expands a beam of the k nodes with the highest cumulative draft
log-probability, each proposing its own k best children; after D depths every drafted node is reranked by
cumulative log-probability and the N best are verified (a kept node's ancestors are always kept).
At temperature > 0 a tree whose shape depended on the drawn tokens would bias the multi-draft verifier,
so the tree keeps the greedy tree's shape (a function of the context alone) and draws its tokens into it:
each node's children without replacement from q at that node. This costs a second pass of the head.

The head keeps its own KV cache (one layer, preallocated, slot = position, like the target's). Row t of
the cache pairs the target feature of token t with token t+1 (see harness.drafters.heads). Committed rows always
hold target features: after a step the accepted drafts' rows are recomputed from the target's features
of the kept tokens (`pending`, fed at the start of the next proposal) and the draft rows, which sit beyond
the committed length, are simply overwritten (a pointer move, no copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.config import HEAD_DTYPES
from harness.drafters.base import Committed, DraftContext, Drafter, sample_or_argmax
from harness.errors import UserError
from harness.drafters.heads import EagleHead, Frozen, head_folder, load_head
from harness.targets.base import causal_or_tree_mask
from harness.types import Proposal


@dataclass(frozen=True)
class TreeShape:
    depth: int  # D: draft tokens on the longest path
    top_k: int  # k: children per expanded node, and nodes expanded per depth
    total_tokens: int  # N: draft nodes verified per step (the root excluded: the target sees N + 1 tokens)


# Defaults when no tree flag is given, by device type: None = chains of --k. Measured on SmolLM2-135M
# (fp32, one CPU thread, 5 mini prompts x 64 tokens, shipped head): tau 1.35 for a chain of 3, 1.46 for
# the tree below and 1.58 for D=6 k=8 N=32, but 6.5, 4.7 and 2.6 tok/s (ar: 10.2): on a CPU the verify
# forward costs about linearly in its tokens, so chains are the default there; GPUs verify wide trees at
# about the cost of one token (EAGLE-2's setting, not measured here).
DEFAULT_SHAPE = {"cpu": None, "cuda": TreeShape(depth=6, top_k=8, total_tokens=48)}
TREE_DEFAULTS = TreeShape(depth=5, top_k=4, total_tokens=10)  # fills the tree flags not given


def tree_shape(cfg, device: torch.device) -> TreeShape | None:
    """The tree a run asks for, or None for chains of --k (--total-tokens 0 forces chains)."""
    if cfg.total_tokens == 0:
        return None
    if cfg.depth is None and cfg.top_k is None and cfg.total_tokens is None:
        return DEFAULT_SHAPE.get(device.type, DEFAULT_SHAPE["cuda"])
    base = TREE_DEFAULTS
    shape = TreeShape(depth=cfg.depth or base.depth, top_k=cfg.top_k or base.top_k,
                      total_tokens=cfg.total_tokens or base.total_tokens)
    if shape.depth < 1 or shape.top_k < 1 or shape.total_tokens < 1:
        raise UserError(f"--depth, --top-k and --total-tokens must be >= 1 (got {shape.depth}, {shape.top_k}, "
                        f"{shape.total_tokens}); --total-tokens 0 drafts chains of --k tokens")
    pool = shape.top_k + (shape.depth - 1) * shape.top_k ** 2
    if shape.total_tokens > pool:
        raise UserError(f"--total-tokens {shape.total_tokens} exceeds the {pool} nodes a tree of depth "
                        f"{shape.depth} and top-k {shape.top_k} drafts: lower it or raise --depth/--top-k")
    return shape


def region_mask(base: torch.Tensor, vis: torch.Tensor, S: int) -> torch.Tensor:
    """[B, 1, T, S] bool: query t sees every committed slot (< base[b]) and draft slot base[b] + r where
    vis[b, t, r] (vis [B, T, R])."""
    R = vis.shape[-1]
    rel = torch.arange(S, device=base.device)[None, :] - base[:, None]  # [B, S]
    inside = (rel >= 0) & (rel < R)
    idx = rel.clamp(0, R - 1)[:, None, :].expand(-1, vis.shape[1], -1)  # [B, T, S]
    return ((rel < 0)[:, None, :] | (torch.gather(vis, 2, idx) & inside[:, None, :]))[:, None]


class EagleDrafter(Drafter):
    has_q = True

    def __init__(self, head: EagleHead, frozen: Frozen, name: str, tree: TreeShape | None, max_len: int,
                 device: torch.device, stop_below: float = 0.0):
        self.head, self.frozen, self.name, self.tree = head, frozen, name, tree
        self.stop_below = stop_below  # chains: stop a row's drafts below this chain probability (0: always K)
        self.hidden_layers = tuple(head.cfg.layers)
        self.device = device
        self.room = max((tree.depth - 1) * tree.top_k if tree else 0, 64)  # draft slots past the committed rows
        self.max_len = max_len + self.room
        self.k_cache = self.v_cache = None

    # -- the head over its cache ---------------------------------------------------------------------
    def _run(self, ids, feats, positions, slots, mask):
        # ids [B, T]; feats [B, T, H]; positions, slots [B, T]; mask [B, 1, T, S] -> head output [B, T, H]
        head = self.head
        x = head.inputs(F.embedding(ids, self.frozen.embed), feats)
        cos, sin = head.rope(positions, x.dtype)
        q, k, v = head.layer.qkv(x, cos, sin)
        b_idx = torch.arange(ids.shape[0], device=ids.device)[:, None]
        self.k_cache[b_idx, :, slots] = k.transpose(1, 2)  # [B, T, Hkv, D] into slots
        self.v_cache[b_idx, :, slots] = v.transpose(1, 2)
        S = mask.shape[-1]
        return head.layer.finish(x, head.layer.attend(q, self.k_cache[:, :, :S], self.v_cache[:, :, :S], mask))

    def _logits(self, out):
        return self.head.to_target_vocab(self.head.logits(out, self.frozen))  # [.., V]

    def _draw(self, out, ctx: DraftContext, positions, confidence: bool = False):
        """(tokens [..], q [.., V] or None, confidence or None) from head outputs [.., H]. When nothing
        reads q (greedy, no meter: ctx.want_q False) the argmax is taken over the draft vocabulary and mapped
        to target ids, without the full-vocabulary scatter and softmax: the same token (draft ids ascend
        with target ids, so ties resolve alike). confidence: (log of q's largest entry, log q(token)) [..]
        each, q being the distribution the token was drawn from (over the draft vocabulary, at its
        temperature); at T = 0 the two are equal."""
        if ctx.temperature == 0 and not ctx.want_q:
            logits = self.head.logits(out, self.frozen)
            top = logits.max(-1)
            ids = top.indices  # full vocabulary (eagle): already target ids
            ids = ids if logits.shape[-1] == self.head.cfg.vocab_size else self.head.target_ids()[ids]
            if not confidence:
                return ids, None, None
            best = top.values.float() - torch.logsumexp(logits.float(), -1)
            return ids, None, (best, best)
        tok, q = sample_or_argmax(self._logits(out), ctx.temperature, ctx.draft_keys, positions)
        if not confidence:
            return tok, q, None
        return tok, q, (torch.log(q.max(-1).values), torch.log(q.gather(-1, tok[..., None])[..., 0]))

    def _span(self) -> int:
        """Attention span for the whole step: committed rows, pending rows and draft rows (host mirror)."""
        need = max(self.lengths_host) + self.pending[0].shape[1] + self.room
        if need > self.max_len:
            raise UserError(f"the eagle head's cache ({self.max_len} slots) is full: raise --max-len")
        return need

    # -- protocol ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def begin(self, ctx: DraftContext) -> None:
        """Allocates the head's cache for the batch's rows; each row is filled by begin_row."""
        B = len(ctx.history)
        s = self.head.cfg
        shape = (B, s.num_kv_heads, self.max_len, s.head_dim)
        if self.k_cache is None or self.k_cache.shape != shape:
            dtype = self.frozen.embed.dtype
            self.k_cache = torch.zeros(shape, device=self.device, dtype=dtype)
            self.v_cache = torch.zeros(shape, device=self.device, dtype=dtype)
        self.lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        self.lengths_host = [0] * B
        H = self.head.cfg.hidden_size
        self.pending = (torch.zeros(B, 1, dtype=torch.long, device=self.device),
                        torch.zeros(B, 1, H, dtype=self.frozen.embed.dtype, device=self.device),
                        torch.zeros(B, dtype=torch.long, device=self.device), [0] * B)

    @torch.inference_mode()
    def begin_row(self, ctx: DraftContext, b: int) -> None:
        """Row b starts over: its head cache empties and its pending rows are the prompt's (x_1 .. x_P
        with the prefill's features)."""
        history = ctx.history[b]
        P = len(history) - 1
        ids, feats, n, n_host = self.pending
        lengths = self.lengths.clone()
        lengths[b] = 0
        self.lengths = lengths
        self.lengths_host[b] = 0
        hidden = ctx.prefill_hidden
        if P < 1 or not hidden:  # a parked row: nothing to feed
            n = n.clone()
            n[b] = 0
            n_host = n_host[:b] + [0] + n_host[b + 1:]
            self.pending = (ids, feats, n, n_host)
            return
        row_feats = self.head.features({h: v[:, -P:] for h, v in hidden.items()})[0]  # [P, H]
        T = max(ids.shape[1], P)
        if T > ids.shape[1]:  # widen every row's pending to the new row's prompt
            ids = F.pad(ids, (0, T - ids.shape[1]))
            feats = F.pad(feats, (0, 0, 0, T - feats.shape[1]))
        else:
            ids, feats = ids.clone(), feats.clone()
        ids[b, :P] = torch.tensor(history[1:], dtype=torch.long, device=self.device)
        feats[b, :P] = row_feats.to(feats.dtype)
        n = n.clone()
        n[b] = P
        self.pending = (ids, feats, n, n_host[:b] + [P] + n_host[b + 1:])

    @torch.inference_mode()
    def keep_rows(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        moved = [(i, r) for i, r in enumerate(rows) if r != i]
        if moved:
            dst = torch.tensor([i for i, _ in moved], device=self.device)
            src = torch.tensor([r for _, r in moved], device=self.device)
            for cache in (self.k_cache, self.v_cache):  # [B, Hkv, S, D]
                cache[dst] = cache[src]
        self.k_cache, self.v_cache = self.k_cache[:len(rows)], self.v_cache[:len(rows)]
        self.lengths = self.lengths[idx]
        self.lengths_host = [self.lengths_host[r] for r in rows]
        ids, feats, n, n_host = self.pending
        self.pending = (ids[idx], feats[idx], n[idx], [n_host[r] for r in rows])

    def _feed_pending(self, S: int) -> torch.Tensor:
        """Feeds the committed rows not yet in the head's cache; returns the output of each sequence's last
        row [B, H], which scores the tokens after the last emitted one."""
        ids, feats, n, n_host = self.pending
        B, T = ids.shape
        slots = self.lengths[:, None] + torch.arange(T, device=self.device)[None, :]  # [B, T]
        mask = causal_or_tree_mask(self.lengths, T, S, None)
        out = self._run(ids, feats, slots, slots, mask)
        self.lengths = self.lengths + n
        self.lengths_host = [a + b for a, b in zip(self.lengths_host, n_host)]
        return out[torch.arange(B, device=self.device), (n - 1).clamp(min=0)]

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Proposal:
        S = self._span()
        out = self._feed_pending(S)
        if self.tree is None:
            return self._chain(ctx, out, S)
        return self._tree(ctx, out, S)

    @torch.inference_mode()
    def observe(self, ctx: DraftContext, committed: Committed) -> None:
        # kept tokens t_0 (the last step's root) .. t_n and the emitted e_1 .. e_{n+1}: rows (f(t_i), e_{i+1})
        feats = self.head.features(ctx.hidden)  # [B, Tk, H]
        B, Tk = feats.shape[:2]
        ids = torch.zeros(B, Tk, dtype=torch.long)
        for b, em in enumerate(committed.emitted):
            ids[b, :len(em)] = torch.tensor(em)
        n_host = [len(em) for em in committed.emitted]
        self.pending = (ids.to(self.device), feats, torch.tensor(n_host, device=self.device), n_host)

    # -- chains ---------------------------------------------------------------------------------------------
    def _chain(self, ctx: DraftContext, out: torch.Tensor, S: int) -> Proposal:
        """K = ctx.k draft tokens per row, each from the head's output at the one before. With stop_below
        > 0 a row proposes draft j only while q_1(x_1) * .. * q_{j-1}(x_{j-1}) * max q_j >= stop_below (the
        head's own estimate that the chain through draft j is accepted; greedily, the product of its
        drafts' probabilities), and the step ends when every row has stopped: rows draft 0..K tokens
        (ragged), so a step spends head forwards and verify width only on drafts likely to be kept.
        Verification stays exact because the decision on draft j reads the earlier drafts and q_j's
        distribution but never x_j itself: x_j, once proposed, is still a draw from q_j. (Deciding on
        q_j(x_j) would keep only x_j's of high q and bias what verification accepts: the chi-square of
        tests/test_lossless.py fails at once with that rule; tested also: greedy outputs equal ar's.)"""
        B, K = out.shape[0], ctx.k
        if K > self.room:
            raise UserError(f"--k {K} exceeds the eagle head's draft room ({self.room})")
        base = self.lengths
        vis = torch.zeros(B, 1, K, dtype=torch.bool, device=self.device)
        feat = out  # [B, H]
        toks, qs = [], []
        stop = self.stop_below > 0
        if stop:
            floor = math.log(self.stop_below)
            chain_logq = torch.zeros(B, device=self.device)  # log of the product of q(draft) so far
            n = torch.zeros(B, dtype=torch.long, device=self.device)  # drafts each row keeps
        for j in range(K):
            tok, q, conf = self._draw(feat, ctx, base + j, confidence=stop)  # [B], [B, V] or None, ([B], [B])
            if stop:
                best, drawn = conf
                going = (chain_logq + best >= floor) & (n == j)  # a row that stopped stays stopped
                if not bool(going.any()):
                    break
                n = n + going
                chain_logq = chain_logq + drawn
            toks.append(tok)
            qs.append(q)
            if j + 1 < K:
                vis[:, 0, j] = True  # draft row j sees rows 0..j
                pos = (base + j)[:, None]
                feat = self._run(tok[:, None], feat[:, None], pos, pos, region_mask(base, vis, S))[:, 0]
        # no row drafting (a stop at draft 1): zero tokens, the step verifies only the bonus token (an ar step)
        tokens = torch.stack(toks, 1) if toks else torch.zeros(B, 0, dtype=torch.long, device=self.device)
        q = torch.stack(qs, 1) if toks and qs[0] is not None else None  # [B, K, V]
        if not stop:
            return Proposal(tokens=tokens, q=q)
        return Proposal(tokens=tokens, q=q, num_draft=n, num_draft_host=n.tolist())

    # -- EAGLE-2 trees --------------------------------------------------------------------------------------
    def _tree(self, ctx: DraftContext, out: torch.Tensor, S: int) -> Proposal:
        greedy = self._greedy_tree(out, S)
        return greedy if ctx.temperature == 0 else self._sample_into(greedy, out, S, ctx.temperature, ctx.draft_keys)

    def _greedy_tree(self, out: torch.Tensor, S: int) -> Proposal:
        """EAGLE-2: expand a beam of the k best nodes per depth by cumulative log q, each with its k best
        children, then keep the N best of every drafted node."""
        D, k, N = self.tree.depth, self.tree.top_k, self.tree.total_tokens
        B, dev = out.shape[0], self.device
        base = self.lengths
        R = max((D - 1) * k, 1)  # head rows drafted this step, k per expanded depth
        logq = torch.log_softmax(self._logits(out).float(), -1)  # [B, V]
        q_root = logq.exp()
        score, tok = logq.topk(k, dim=-1)  # [B, k]: the pool of drafted nodes, in creation order
        par = torch.full((B, k), -1, device=dev)  # pool index of the parent, -1 = the root
        depth = torch.ones(B, k, dtype=torch.long, device=dev)
        row = torch.full((B, k), -1, device=dev)  # head row of an expanded node (its q), -1 for a leaf
        q_rows, vis_rows = [], torch.zeros(B, R, R, dtype=torch.bool, device=dev)
        beam = torch.arange(k, device=dev).expand(B, k)  # pool indices expanded at this depth
        feats = out[:, None].expand(B, k, -1)  # [B, k, H]: the feature each beam node is fed with
        beam_par_rows = torch.full((B, k), -1, device=dev)
        for d in range(1, D):
            rows = torch.arange((d - 1) * k, d * k, device=dev).expand(B, k)  # [B, k]
            vis = vis_rows.gather(1, beam_par_rows.clamp(min=0)[..., None].expand(-1, -1, R))
            vis = (vis & (beam_par_rows >= 0)[..., None]) | F.one_hot(rows, R).bool()  # ancestors + itself
            vis_rows[:, (d - 1) * k:d * k] = vis
            pos = (base + d - 1)[:, None].expand(B, k)
            h = self._run(tok.gather(1, beam), feats, pos, base[:, None] + rows, region_mask(base, vis, S))
            clogq = torch.log_softmax(self._logits(h).float(), -1)  # [B, k, V]
            q_rows.append(clogq.exp())
            clp, ctok = clogq.topk(k, dim=-1)  # [B, k, k]
            row = row.scatter(1, beam, rows)
            cscore = (score.gather(1, beam)[..., None] + clp).reshape(B, k * k)  # cumulative log q
            top = cscore.topk(k, dim=-1).indices  # the next beam, among the new nodes
            offset = tok.shape[1]
            tok = torch.cat([tok, ctok.reshape(B, k * k)], 1)
            score = torch.cat([score, cscore], 1)
            par = torch.cat([par, beam[..., None].expand(B, k, k).reshape(B, k * k)], 1)
            depth = torch.cat([depth, torch.full((B, k * k), d + 1, device=dev)], 1)
            row = torch.cat([row, torch.full((B, k * k), -1, device=dev)], 1)
            beam, beam_par_rows = offset + top, rows.gather(1, top // k)
            feats = h.gather(1, (top // k)[..., None].expand(-1, -1, h.shape[-1]))
        # rerank: a child never scores above its parent (log q <= 0) and ties keep creation order, so the
        # N best always include their ancestors
        M = tok.shape[1]
        sel = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :N].sort(dim=1).values  # [B, N]
        node_of = torch.full((B, M), -1, dtype=torch.long, device=dev)
        node_of.scatter_(1, sel, torch.arange(1, N + 1, device=dev).expand(B, N))
        sel_par = par.gather(1, sel)
        parents = torch.where(sel_par < 0, 0, node_of.gather(1, sel_par.clamp(min=0)))  # [B, N]
        V = q_root.shape[-1]
        q_all = torch.cat([q_root[:, None], *q_rows, q_root.new_zeros(B, 1, V)], 1)  # [B, 1 + R + 1, V]
        sel_row = row.gather(1, sel)
        q_idx = torch.where(sel_row < 0, q_all.shape[1] - 1, sel_row + 1)  # leaves read the zero row
        q = torch.cat([q_all[:, :1], q_all.gather(1, q_idx[..., None].expand(-1, -1, V))], 1)  # [B, N+1, V]
        zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
        return Proposal(tokens=torch.cat([zero, tok.gather(1, sel)], 1), q=q,
                        parents=torch.cat([zero - 1, parents], 1), depth=torch.cat([zero, depth.gather(1, sel)], 1),
                        num_nodes=torch.full((B,), N + 1, dtype=torch.long, device=dev), bounds=(D, k))

    def _sample_into(self, greedy: Proposal, out: torch.Tensor, S: int, temperature: float,
                     keys: torch.Tensor) -> Proposal:
        """Temperature > 0: the greedy tree's shape (a function of the context alone) with tokens drawn into
        it: the children of each node are drawn without replacement from q = softmax(head logits / T) at
        that (drawn) node, in node order (Gumbel top-k keyed by the row's draft key, the node's position
        and index). The multi-draft verifier is then exact. A node never gets more children than tokens
        with q > 0: the extra children (and their subtrees) are dropped and the tree compacted, so rows
        may end up with fewer nodes (num_nodes). All on the device, for every row at once: at each depth
        the (at most k) nodes with children are fed to the head in k fixed rows."""
        D, k = self.tree.depth, self.tree.top_k
        dev, (B, T) = self.device, greedy.parents.shape
        V = self.frozen.embed.shape[0]
        parents, depth = greedy.parents, greedy.depth  # [B, T]
        node = torch.arange(T, device=dev)
        child_of = (parents[:, :, None] == node[None, None, :])  # [B, T(child), T(parent)]
        has_kids = child_of.any(1)  # [B, T]
        same = parents[:, :, None] == parents[:, None, :]
        rank = (same & (node[None, :, None] > node[None, None, :])).sum(-1)  # [B, T]: earlier siblings
        base = self.lengths
        tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        q = torch.zeros(B, T, V, device=dev)
        alive = torch.ones(B, T, dtype=torch.bool, device=dev)

        def draw(qn: torch.Tensor, at: torch.Tensor, ok: torch.Tensor) -> None:
            # qn [B, k', V] at the nodes at [B, k'] (ok: real nodes); their children get ranked tokens
            kk = qn.shape[1]
            pos = ((base[:, None] + depth.gather(1, at)) * T + at).reshape(-1)  # one stream per node
            from harness.seeds import gumbel
            g = gumbel(keys.repeat_interleave(kk), pos, V).view(B, kk, V)
            ranked = (torch.log(qn) + g).topk(k, dim=-1).indices  # [B, k', k] draw order
            nnz = (qn > 0).sum(-1)  # [B, k']
            for i in range(kk):  # k' <= k columns: fixed, not data-dependent
                mine = (parents == at[:, i:i + 1]) & ok[:, i:i + 1] & (node[None, :] > 0)  # [B, T] its children
                r = rank.clamp(max=k - 1)
                tok = ranked[:, i].gather(1, r)  # [B, T]
                tokens.copy_(torch.where(mine, tok, tokens))
                alive.copy_(alive & ~(mine & (rank >= nnz[:, i:i + 1])))

        q_root = torch.softmax(self._logits(out).float() / temperature, -1)  # [B, V]
        q[:, 0] = q_root
        zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
        draw(q_root[:, None], zero, torch.ones(B, 1, dtype=torch.bool, device=dev))
        R = max((D - 1) * k, 1)
        vis_rows = torch.zeros(B, R, R, dtype=torch.bool, device=dev)
        out_rows = out.new_zeros(B, R, out.shape[-1])  # head output of each fed row
        row_of = torch.full((B, T), -1, dtype=torch.long, device=dev)  # head row of a fed node
        for d in range(1, D):
            fed_mask = has_kids & (depth == d)  # [B, T]
            score = torch.where(fed_mask, T - node[None, :], 0)
            fed = score.topk(k, dim=1).indices  # [B, k] node indices (dummies where fewer)
            ok = fed_mask.gather(1, fed)
            rows = torch.arange((d - 1) * k, d * k, device=dev).expand(B, k)
            row_of.scatter_(1, fed, torch.where(ok, rows, row_of.gather(1, fed)))
            par = parents.gather(1, fed).clamp(min=0)
            prow = row_of.gather(1, par)  # [B, k]: -1 when the parent is the root
            vis = vis_rows.gather(1, prow.clamp(min=0)[..., None].expand(-1, -1, R)) & (prow >= 0)[..., None]
            vis = vis | F.one_hot(rows, R).bool()
            vis_rows[:, (d - 1) * k:d * k] = vis
            feats = torch.where((prow >= 0)[..., None], out_rows.gather(1, prow.clamp(min=0)[..., None].expand(
                -1, -1, out.shape[-1])), out[:, None])
            h = self._run(tokens.gather(1, fed), feats, (base + d - 1)[:, None].expand(B, k), base[:, None] + rows,
                          region_mask(base, vis, S))  # [B, k, H]
            out_rows[:, (d - 1) * k:d * k] = h
            qn = torch.softmax(self._logits(h).float() / temperature, -1)  # [B, k, V]
            q.scatter_(1, fed[..., None].expand(-1, -1, V), torch.where(ok[..., None], qn, q.gather(
                1, fed[..., None].expand(-1, -1, V))))
            draw(qn, fed, ok)
        # a dropped child takes its subtree with it (parents precede children)
        for _ in range(D):
            alive = alive & torch.where(parents >= 0, alive.gather(1, parents.clamp(min=0)), True)
        alive = alive & (node[None, :] < greedy.num_nodes[:, None])
        order = torch.sort((~alive).long(), dim=1, stable=True).indices  # live nodes first, in order
        new_of = torch.argsort(order, dim=1)
        p_old = parents.gather(1, order)
        new_par = torch.where(p_old >= 0, new_of.gather(1, p_old.clamp(min=0)), -1)
        n_live = alive.sum(1)
        keep = node[None, :] < n_live[:, None]
        return Proposal(tokens=torch.where(keep, tokens.gather(1, order), 0),
                        q=q.gather(1, order[..., None].expand(-1, -1, V)) * keep[..., None],
                        parents=torch.where(keep, new_par, -1), depth=torch.where(keep, depth.gather(1, order), 0),
                        num_nodes=n_live, bounds=greedy.bounds)  # padding: token 0, q 0, parent -1, depth 0


def head_dtype(name: str | None, target) -> torch.dtype:
    """The dtype the head drafts in: `head_dtype` (eagle, eagle3), else the target's. A bf16 head beside an
    fp32 target is a CPU option (its one-row products cost about half); verification stays the target's."""
    if not name:
        return target.dtype
    if name not in HEAD_DTYPES:
        raise UserError(f"head_dtype must be {' or '.join(HEAD_DTYPES)}, got '{name}'")
    if target.device.type != "cpu":
        raise UserError(f"head_dtype applies on the CPU; on {target.device.type} the head drafts in the target's "
                        "dtype: drop head_dtype")
    return getattr(torch, name)


def build_eagle(name: str, target, cfg) -> EagleDrafter:
    """The `eagle` / `eagle3` drafter: cfg.head, else the head shipped for this target."""
    folder = head_folder(name, target, cfg)
    dtype = head_dtype(cfg.head_dtype, target)
    head = load_head(folder, target, name, dtype)
    frozen = Frozen.of(target).to(dtype)
    tree = tree_shape(cfg, target.device)
    if cfg.stop_below and tree is not None:
        raise UserError(f"stop_below applies to chains ({name}:k=K:total_tokens=0:stop_below=P); a tree already "
                        "keeps its most probable nodes: drop stop_below or pass total_tokens=0")
    if not 0 <= cfg.stop_below < 1:
        raise UserError(f"stop_below must be in [0, 1), got {cfg.stop_below}")
    return EagleDrafter(head, frozen, name, tree, target.max_len, target.device, cfg.stop_below)
