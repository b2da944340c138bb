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

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.drafters.base import Committed, DraftContext, Drafter, sample_or_argmax
from harness.errors import UserError
from harness.drafters.heads import EagleHead, Frozen, load_head, shipped_head
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
                 device: torch.device):
        self.head, self.frozen, self.name, self.tree = head, frozen, name, tree
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

    def _span(self) -> int:
        """Attention span for the whole step: committed rows, pending rows and draft rows (one host read)."""
        need = int(self.lengths.max()) + self.pending[0].shape[1] + self.room
        if need > self.max_len:
            raise UserError(f"the eagle head's cache ({self.max_len} slots) is full: raise --max-len")
        return need

    # -- protocol ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def begin(self, ctx: DraftContext) -> None:
        B = len(ctx.history)
        s = self.head.cfg
        shape = (B, s.num_kv_heads, self.max_len, s.head_dim)
        if self.k_cache is None or self.k_cache.shape != shape:
            dtype = self.frozen.embed.dtype
            self.k_cache = torch.zeros(shape, device=self.device, dtype=dtype)
            self.v_cache = torch.zeros(shape, device=self.device, dtype=dtype)
        self.lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(ctx.seed)
        hidden = getattr(ctx, "prefill_hidden", None) or ctx.hidden  # the prompt's rows
        P = len(ctx.history[0]) - 1
        if any(len(h) - 1 != P for h in ctx.history) or next(iter(hidden.values())).shape[1] != P:
            raise RuntimeError("eagle drafters need the prefill's hidden states of equal-length prompts")
        ids = torch.tensor([h[1:] for h in ctx.history], dtype=torch.long, device=self.device)  # x_1 .. x_P
        self.pending = (ids, self.head.features(hidden), torch.full((B,), P, device=self.device))

    def _feed_pending(self, S: int) -> torch.Tensor:
        """Feeds the committed rows not yet in the head's cache; returns the output of each sequence's last
        row [B, H], which scores the tokens after the last emitted one."""
        ids, feats, n = self.pending
        B, T = ids.shape
        slots = self.lengths[:, None] + torch.arange(T, device=self.device)[None, :]  # [B, T]
        mask = causal_or_tree_mask(self.lengths, T, S, None)
        out = self._run(ids, feats, slots, slots, mask)
        self.lengths = self.lengths + n
        return out[torch.arange(B, device=self.device), n - 1]

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
        n = torch.tensor([len(em) for em in committed.emitted], device=self.device)
        self.pending = (ids.to(self.device), feats, n)

    # -- chains ---------------------------------------------------------------------------------------------
    def _chain(self, ctx: DraftContext, out: torch.Tensor, S: int) -> Proposal:
        B, K = out.shape[0], ctx.k
        if K > self.room:
            raise UserError(f"--k {K} exceeds the eagle head's draft room ({self.room})")
        base = self.lengths
        vis = torch.zeros(B, 1, K, dtype=torch.bool, device=self.device)
        feat = out  # [B, H]
        toks, qs = [], []
        for j in range(K):
            tok, q = sample_or_argmax(self._logits(feat), ctx.temperature, self.generator)  # [B], [B, V]
            toks.append(tok)
            qs.append(q)
            if j + 1 < K:
                vis[:, 0, j] = True  # draft row j sees rows 0..j
                pos = (base + j)[:, None]
                feat = self._run(tok[:, None], feat[:, None], pos, pos, region_mask(base, vis, S))[:, 0]
        return Proposal(tokens=torch.stack(toks, 1), q=torch.stack(qs, 1))  # [B, K], q [B, K, V]

    # -- EAGLE-2 trees --------------------------------------------------------------------------------------
    def _tree(self, ctx: DraftContext, out: torch.Tensor, S: int) -> Proposal:
        greedy = self._greedy_tree(out, S)
        return greedy if ctx.temperature == 0 else self._sample_into(greedy, out, S, ctx.temperature)

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
                        num_nodes=torch.full((B,), N + 1, dtype=torch.long, device=dev))

    def _sample_into(self, greedy: Proposal, out: torch.Tensor, S: int, temperature: float) -> Proposal:
        """Temperature > 0: the greedy tree's shape (a function of the context alone) with tokens drawn into
        it: the children of each node are drawn without replacement from q = softmax(head logits / T) at
        that (drawn) node, in node order. The multi-draft verifier is then exact. A node gets no more
        children than q has tokens with q > 0: the children left without a token are dropped with their
        subtrees (num_nodes shrinks, the kept nodes keep their order, padding at the end)."""
        if out.shape[0] != 1:
            raise UserError("eagle trees at temperature > 0 decode one sequence at a time: use --batch-size 1")
        dev = self.device
        parents, depth = greedy.parents[0].tolist(), greedy.depth[0].tolist()
        T, D = len(parents), max(depth)
        kids = [[c for c in range(1, T) if parents[c] == n] for n in range(T)]
        tokens = torch.zeros(T, dtype=torch.long, device=dev)
        drawn = torch.ones(T, dtype=torch.bool, device=dev)  # False: no token with q > 0 was left for it
        q = torch.zeros(T, self.frozen.embed.shape[0], device=dev)
        q[0] = torch.softmax(self._logits(out[0]).float() / temperature, -1)
        self._draw(q[0], kids[0], tokens, drawn)
        outputs, rows = {0: out[0]}, {}  # head output at a node; head row of a fed node
        R = self.room
        vis_rows = torch.zeros(R, R, dtype=torch.bool, device=dev)
        base = self.lengths
        for d in range(1, D):
            fed = [n for n in range(1, T) if depth[n] == d and kids[n]]
            if not fed:
                break
            for n in fed:
                r = rows[n] = len(rows)
                vis_rows[r] = vis_rows[rows[parents[n]]] if parents[n] else False
                vis_rows[r, r] = True
            idx = torch.tensor([rows[n] for n in fed], device=dev)
            h = self._run(tokens[fed][None], torch.stack([outputs[parents[n]] for n in fed])[None],
                          (base + d - 1)[:, None].expand(1, len(fed)), base[:, None] + idx[None],
                          region_mask(base, vis_rows[idx][None], S))[0]  # [len(fed), H]
            for i, n in enumerate(fed):
                outputs[n] = h[i]
                q[n] = torch.softmax(self._logits(h[i]).float() / temperature, -1)
                self._draw(q[n], kids[n], tokens, drawn)
        return drop_undrawn(tokens, q, greedy.parents[0], greedy.depth[0], drawn, D)

    def _draw(self, q: torch.Tensor, children: list[int], tokens: torch.Tensor, drawn: torch.Tensor) -> None:
        """Draws len(children) tokens from q [V] without replacement (Gumbel top-k: in draw order). Only
        tokens with q > 0 can be drawn: when fewer are left than children, drawn[c] = False for the last
        children (their top-k key is -inf). No host read."""
        if children:
            u = torch.rand(q.shape, generator=self.generator, device=q.device).clamp_(min=1e-20)
            keys = torch.log(q) - torch.log(-torch.log(u))  # -inf exactly where q = 0 (the noise is finite)
            top = keys.topk(len(children))
            tokens[children] = top.indices
            drawn[children] = top.values > float("-inf")


def drop_undrawn(tokens: torch.Tensor, q: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                 drawn: torch.Tensor, max_depth: int) -> Proposal:
    """One tree (tokens, parents, depth, drawn [T], q [T, V]) without its undrawn nodes and their
    subtrees, as a Proposal of the same size T: kept nodes first in their order (parents still precede
    children), num_nodes = the kept count, padding with parents -1, depth 0, token 0 and q 0. No host read."""
    T = tokens.shape[0]
    par = parents.clamp(min=0)
    alive = drawn.clone()
    alive[0] = True
    for _ in range(max_depth - 1):  # after i rounds every node of depth <= i + 1 is final
        alive = alive & alive[par]
    order = torch.sort((~alive).long(), stable=True).indices  # [T] kept nodes first, in index order
    new_of = torch.empty_like(order).scatter_(0, order, torch.arange(T, device=order.device))  # old -> new
    keep = alive[order]  # [T]
    par_o = parents[order]
    new_par = torch.where(keep & (par_o >= 0), new_of[par_o.clamp(min=0)], -1)
    return Proposal(tokens=torch.where(keep, tokens[order], 0)[None], q=(q[order] * keep[:, None])[None],
                    parents=new_par[None], depth=torch.where(keep, depth[order], 0)[None],
                    num_nodes=alive.sum()[None])


def build_eagle(name: str, target, cfg) -> EagleDrafter:
    """The `eagle` / `eagle3` drafter: cfg.head, else the head shipped for this target."""
    folder = cfg.head or shipped_head(target.name, name)
    if folder is None:
        raise UserError(f"no {name} head for target '{target.name}': train one with `spec-harness train-head "
                        f"--target {cfg.target} --variant {name} --out heads/{target.name}-{name}` and pass "
                        f"--head heads/{target.name}-{name}")
    if not Path(folder).exists():
        raise UserError(f"head folder {folder} not found: check --head")
    head = load_head(folder, target, name)
    frozen = Frozen.of(target)
    return EagleDrafter(head, frozen, name, tree_shape(cfg, target.device), target.max_len, target.device)
