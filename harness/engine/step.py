"""The speculative step for B >= 1 rows: propose -> verify forward -> verify -> commit -> observe.

`ar` goes through the same step with zero drafts, so every figure is measured the same way; batch 1 is
the same code with B = 1 (harness.engine.scheduler admits and retires rows around it).

What crosses between host and device in one step:
  host -> device  the last emitted token of each row ([B, 1], from the host history) and, for parked
                  rows, a [B] mask: copies, no synchronisation.
  device -> host  ONE read, after verification: per row the accepted count, the error flag, the
                  draft size and depth, and the emitted tokens ([B, 4 + Dmax + 1] int64). Nothing else is read back: tree masks,
                  tree positions and the verifier's bounds come from the proposal's device tensors and
                  host ints known from the tree's shape; the target's attention span comes from its host
                  mirror of the lengths (`lengths_host`), updated from this same read.
The drafters' own host work (ngram's lookup, a draft model's pending tokens) reads only host lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.drafters.base import Committed, DraftContext, Drafter
from harness.engine.verify import verify_chain, verify_tree
from harness.timing import PhaseClock


def tree_mask(parents: torch.Tensor) -> torch.Tensor:
    """[B, T] parent indices (-1: root or padding) -> [B, T, T] bool: node t sees itself and its ancestors.
    Pointer doubling on the device: ceil(log2 T) gathers, no host read."""
    B, T = parents.shape
    dev = parents.device
    mask = torch.eye(T, dtype=torch.bool, device=dev).expand(B, T, T).clone()  # ancestors within distance 0
    node = torch.arange(T, device=dev).expand(B, T)
    jump = torch.where(parents >= 0, parents, node)  # 1st ancestor (the root and padding point to themselves)
    mask |= torch.nn.functional.one_hot(jump, T).bool()
    for _ in range(max(0, math.ceil(math.log2(max(T, 2))))):  # mask: ancestors within 2^i; jump: 2^i-th
        mask |= torch.gather(mask, 1, jump[..., None].expand(B, T, T))
        jump = torch.gather(jump, 1, jump)
    return mask


@dataclass
class StepOut:
    """One step's results on the host, per row (parked rows included; the scheduler ignores them)."""

    accepted: list[int]  # drafts the target kept
    emitted: list[list[int]]  # kept tokens after the cut at EOS / the row's room: accepted drafts + final
    error: list[bool]  # NaN/inf in the target's logits
    drafted: list[int]  # draft tokens proposed (tree: nodes - 1)
    depth: list[int]  # longest draft path proposed
    is_tree: bool
    stats: dict  # the verifier's stats, device tensors (the meter reads them outside the timed region)
    num_accepted: torch.Tensor  # [B] device


class Engine:
    """Runs the step for a drafter over a target whose cache rows the scheduler fills."""

    def __init__(self, target, drafter: Drafter, temperature: float, verify_backend: str = "auto",
                 clock: PhaseClock | None = None, stats: bool = True):
        self.target, self.drafter = target, drafter
        self.temperature, self.verify_backend = temperature, verify_backend
        self.stats = stats  # the verifier's per-draft statistics are read (by a meter)
        self.clock = clock or PhaseClock(target.device)

    @torch.inference_mode()
    def step(self, ctx: DraftContext, live: list[bool], room: list[int], eos: set[int]) -> StepOut:
        """One step for every row. live: rows that commit (parked rows commit nothing); room: tokens each
        row may still emit; emitted tokens are cut at the first EOS and at room, and ctx.history grows."""
        target, drafter, clock, dev = self.target, self.drafter, self.clock, self.target.device
        clock.start()
        prop = drafter.propose(ctx)  # draft
        clock.mark("draft")
        last = torch.tensor([[h[-1]] for h in ctx.history], dtype=torch.long, device=dev)  # [B, 1]
        if prop.is_tree:
            tokens = prop.tokens.clone()
            tokens[:, 0] = last[:, 0]
            positions = target.lengths[:, None] + prop.depth  # [B, T]
            fwd = target.forward(tokens, positions=positions, tree_mask=tree_mask(prop.parents),
                                 hidden_layers=drafter.hidden_layers)  # verify forward
            clock.mark("verify")
            res = verify_tree(fwd.logits, prop, self.temperature, ctx.verify_keys, target.lengths + 1,
                              self.verify_backend, self.stats)
        else:
            fwd = target.forward(torch.cat([last, prop.tokens], 1), hidden_layers=drafter.hidden_layers)
            clock.mark("verify")
            res = verify_chain(fwd.logits, prop, self.temperature, ctx.verify_keys, target.lengths + 1,
                               self.verify_backend, self.stats)
        B = last.shape[0]
        sizes = _sizes(prop, B, dev)  # [B, 2]: drafted, depth (device values the record needs)
        host = torch.cat([res.num_accepted[:, None], res.error[:, None].long(), sizes, res.emitted], 1).tolist()  # THE read
        accepted = [h[0] for h in host]
        keep_host = [a + 1 if ok else 0 for a, ok in zip(accepted, live)]
        keep = res.num_accepted + 1
        if not all(live):  # parked rows commit nothing
            keep = keep * torch.tensor(live, dtype=keep.dtype, device=dev)
        if prop.is_tree:
            target.commit_path(res.path.clamp(min=0), keep, keep_host)  # accepted path into consecutive slots
        else:
            target.commit(keep, keep_host)  # rollback = keep last + accepted drafts (a pointer move)
        full = [h[4:a + 5] for h, a in zip(host, accepted)]
        clock.mark("accept")
        emitted = []
        for b, toks in enumerate(full):
            kept = _cut(toks[:max(room[b], 0)], eos) if live[b] else []
            emitted.append(kept)
            ctx.history[b].extend(kept)
        if fwd.hidden:
            if prop.is_tree:
                idx = res.path.clamp(min=0)  # [B, D+1] accepted nodes, root first
                ctx.hidden = {h: v.gather(1, idx[..., None].expand(-1, -1, v.shape[-1])) for h, v in fwd.hidden.items()}
            else:
                width = max(accepted) + 1  # graphs reuse their outputs: keep a copy
                ctx.hidden = {h: v[:, :width].clone() for h, v in fwd.hidden.items()}  # [B, max kept, H]
            ctx.hidden_valid = res.num_accepted + 1
        drafter.observe(ctx, Committed(num_accepted=res.num_accepted, accepted=accepted, emitted=full,
                                       path=res.path))
        clock.mark("other")
        return StepOut(accepted=accepted, emitted=emitted, error=[bool(h[1]) for h in host],
                       drafted=[h[2] for h in host], depth=[h[3] for h in host], is_tree=prop.is_tree,
                       stats=res.stats, num_accepted=res.num_accepted)


def _sizes(prop, B: int, dev) -> torch.Tensor:
    """[B, 2] int64 on the device: draft tokens proposed and the longest draft path, per row."""
    if prop.is_tree:
        T = prop.tokens.shape[1]
        n = prop.num_nodes.to(dev) if prop.num_nodes is not None else torch.full((B,), T, device=dev)
        valid = torch.arange(T, device=dev)[None, :] < n[:, None]
        depth = torch.where(valid, prop.depth.to(dev), 0).max(1).values
        return torch.stack([n - 1, depth], 1).long()
    K = prop.tokens.shape[1]
    n = prop.num_draft.to(dev) if prop.num_draft is not None else torch.full((B,), K, device=dev)
    return torch.stack([n, n], 1).long()


def _cut(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1]
    return tokens
