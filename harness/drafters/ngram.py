"""`ngram`: prompt lookup decoding. Match the last n tokens (n from max_n down to min_n) against earlier
context, most recent match first, and propose the K tokens that followed it. q is one-hot."""

from __future__ import annotations

import torch

from harness.drafters.base import DraftContext, Drafter
from harness.types import Proposal


def lookup(history: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    L = len(history)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        tail = history[L - n:]
        for start in range(L - n - 1, -1, -1):  # most recent earlier occurrence first
            if history[start:start + n] == tail:
                follow = history[start + n:start + n + k]
                if follow:
                    return follow
    return []


class NGram(Drafter):
    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, ctx: DraftContext) -> Proposal:
        drafts = [lookup(h, ctx.k, self.max_n, self.min_n) for h in ctx.history]
        K = max((len(d) for d in drafts), default=0)
        tokens = torch.zeros(len(drafts), K, dtype=torch.long)
        for b, d in enumerate(drafts):
            tokens[b, :len(d)] = torch.tensor(d, dtype=torch.long)
        counts = [len(d) for d in drafts]
        return Proposal(tokens=tokens.to(ctx.device), num_draft=torch.tensor(counts).to(ctx.device),
                        num_draft_host=counts)

    def begin_row(self, ctx: DraftContext, b: int) -> None:
        """No per-row state."""

    def keep_rows(self, rows: list[int]) -> None:
        """No per-row state."""
