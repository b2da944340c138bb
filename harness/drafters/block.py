"""`block`: a block drafter (after DFlash, arXiv 2602.06036, and PARD) that drafts K tokens in ONE head
forward, its K - 1 query positions attending to the target's fused hidden states.

The head is the EAGLE-3 head (harness.drafters.eagle3) plus one learned mask embedding m [H]. Committed
rows are the eagle3 rows (fused target feature g_t with the embedding of token t+1), so the output of the
last committed row scores draft 1 exactly as eagle3 does. Drafts 2..K come from K - 1 query rows fed
together: query j (j = 1..K-1) is the pair [m ; o] at position P - 1 + j, where o is the last committed
row's output (the same for every query: no draft token is fed back), and it sees every committed row and
queries 1..j. Query j scores draft j + 1. One forward for the whole block instead of K - 1 sequential
ones; the drafts are argmax (T = 0) or samples from each row's q, verified as a chain.

Training (`train-head --variant block`) is the eagle3 unroll with step s >= 1 fed [m ; step-0 output] in
place of [embed(next token) ; own previous output]; the attention pattern is the same (see
harness.training.train_head.Unrolled), so training and drafting see the same rows.
"""

from __future__ import annotations

import torch

from harness.drafters.base import DraftContext
from harness.drafters.block_head import BlockHead, init_block  # noqa: F401 (re-exported)
from harness.drafters.eagle import EagleDrafter, region_mask
from harness.errors import UserError
from harness.types import Proposal


class BlockDrafter(EagleDrafter):
    """Chains of --k drafts, one head forward for drafts 2..K (trees are not drafted by blocks)."""

    def __init__(self, head: BlockHead, frozen, name: str, max_len: int, device: torch.device):
        super().__init__(head, frozen, name, None, max_len, device)

    def _run_queries(self, feats, positions, slots, mask):
        # feats [B, T, H] (each query's feature); positions, slots [B, T]; mask [B, 1, T, S] -> [B, T, H]
        head = self.head
        B, T, H = feats.shape
        x = head.inputs(head.mask_embed.to(feats.dtype).expand(B, T, H), feats)
        cos, sin = head.rope(positions, x.dtype)
        q, k, v = head.layer.qkv(x, cos, sin)
        b_idx = torch.arange(B, device=feats.device)[:, None]
        self.k_cache[b_idx, :, slots] = k.transpose(1, 2)
        self.v_cache[b_idx, :, slots] = v.transpose(1, 2)
        S = mask.shape[-1]
        return head.layer.finish(x, head.layer.attend(q, self.k_cache[:, :, :S], self.v_cache[:, :, :S], mask))

    def _chain(self, ctx: DraftContext, out: torch.Tensor, S: int) -> Proposal:
        B, K = out.shape[0], ctx.k
        if K > self.room:
            raise UserError(f"--k {K} exceeds the block head's draft room ({self.room})")
        tok, q, _ = self._draw(out, ctx, self.lengths)  # draft 1: [B], [B, V] (None when nothing reads q)
        if K == 1:
            return Proposal(tokens=tok[:, None], q=None if q is None else q[:, None])
        base = self.lengths
        J = K - 1
        vis = torch.ones(J, J, device=self.device).tril().bool()[None].expand(B, J, J)  # query j sees 1..j
        pos = base[:, None] + torch.arange(J, device=self.device)[None]  # [B, J]
        h = self._run_queries(out[:, None].expand(B, J, -1), pos, pos, region_mask(base, vis, S))  # [B, J, H]
        toks, qs, _ = self._draw(h, ctx, pos + 1)  # [B, J], [B, J, V]
        return Proposal(tokens=torch.cat([tok[:, None], toks], 1),
                        q=None if q is None else torch.cat([q[:, None], qs], 1))


def build_block(target, cfg) -> BlockDrafter:
    """The `block` drafter: cfg.head, else the head shipped for this target."""
    from harness.drafters.heads import Frozen, head_folder, load_head

    folder = head_folder("block", target, cfg, train_flags=" --data sharegpt")
    return BlockDrafter(load_head(folder, target, "block"), Frozen.of(target), "block", target.max_len, target.device)
