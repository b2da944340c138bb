"""The block head's module (see harness.drafters.block for the drafter and the design)."""

from __future__ import annotations

import torch
from torch import nn

from harness.drafters.eagle3 import Eagle3Head, init_eagle3


class BlockHead(Eagle3Head):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.mask_embed = nn.Parameter(torch.zeros(cfg.hidden_size))  # [H]: the input of every query row


def init_block(cfg, frozen, seed: int, token_counts: torch.Tensor | None = None) -> BlockHead:
    """A fresh block head: init_eagle3's, with the mask embedding at the mean of the target's embeddings."""
    head = init_eagle3(cfg, frozen, seed, token_counts, cls=BlockHead)
    with torch.no_grad():
        head.mask_embed.copy_(frozen.embed.detach().float().cpu().mean(0))
    return head


