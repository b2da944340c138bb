"""`ar`: no drafting (K = 0). The baseline that every speedup is measured against, run through the same loop."""

import torch

from harness.drafters.base import DraftContext, Drafter
from harness.types import Proposal


class AR(Drafter):
    name = "ar"

    def propose(self, ctx: DraftContext) -> Proposal:
        B = len(ctx.history)
        return Proposal(tokens=torch.zeros(B, 0, dtype=torch.long, device=ctx.device),
                        num_draft=torch.zeros(B, dtype=torch.long, device=ctx.device), num_draft_host=[0] * B)

    def begin_row(self, ctx: DraftContext, b: int) -> None:
        """No per-row state."""

    def keep_rows(self, rows: list[int]) -> None:
        """No per-row state."""
