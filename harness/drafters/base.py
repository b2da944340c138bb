"""The drafter protocol. A drafter never holds the target: the runner hands it the committed tokens and
the target hidden states it asked for (`hidden_layers`), and tells it what verification kept.

Life of a drafter over one prompt (batch of B sequences):
    begin(ctx)                 after the target's prefill
    propose(ctx) -> Proposal   each step: K draft tokens per sequence (a chain) or a tree
    observe(ctx, out)          after verification: what each sequence committed
Batches that change members (harness.engine.scheduler) also call begin_row(ctx, b) when a sequence joins row b
and keep_rows(rows) when finished sequences leave.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from harness.errors import UserError
from harness.types import Proposal


@dataclass
class DraftContext:
    """What the runner lets a drafter read.

    history: committed token ids per sequence (prompt + output), the last entry being the token that the
             next step feeds the target (emitted, not yet in the target's cache).
    hidden:  target hidden states of the tokens committed by the last step, layer -> [B, T, H], with
             hidden_valid [B] telling how many of the T rows each sequence committed.
    """

    history: list[list[int]]
    k: int
    temperature: float
    seed: int
    device: torch.device
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden_valid: torch.Tensor | None = None


@dataclass
class Committed:
    """What verification kept for each sequence in the last step."""

    num_accepted: torch.Tensor  # [B] on the device
    accepted: list[int]  # the same, on the host
    emitted: list[list[int]]  # per sequence: accepted drafts then the recovered/bonus token
    path: torch.Tensor | None = None  # trees: [B, D+1] accepted node indices


class Drafter(ABC):
    name: str = "drafter"
    has_q: bool = False  # False: q is one-hot on the proposed tokens
    hidden_layers: tuple[int, ...] = ()  # target layers whose hidden states this drafter reads

    def begin(self, ctx: DraftContext) -> None:
        """Called once per prompt (or turn) after the target's prefill."""

    @abstractmethod
    def propose(self, ctx: DraftContext) -> Proposal:
        """Draft tokens for the next step."""

    def observe(self, ctx: DraftContext, committed: Committed) -> None:
        """Called after verification with what each sequence kept."""

    def begin_row(self, ctx: DraftContext, b: int) -> None:
        """Batches (harness.engine.scheduler): a new sequence, or the next turn of one, took row b after the target
        prefilled that row; ctx.history[b] is its context and ctx.prefill_hidden its prefill's hidden
        states (layer -> [1, T, H]). Drafters that decode batches override this and `keep_rows`."""
        raise UserError(f"the {self.name} drafter does not decode batches: use --batch-size 1")

    def keep_rows(self, rows: list[int]) -> None:
        """Batches: finished sequences left; row i now holds what row rows[i] held (len(rows) rows)."""
        raise UserError(f"the {self.name} drafter does not decode batches: use --batch-size 1")


def sample_or_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """Returns (token [..], q [.., V]): q = softmax(logits / t) with t = temperature, or 1 when greedy
    (the meter reads q at the temperature-1 distribution then; the greedy token is the argmax)."""
    t = temperature if temperature > 0 else 1.0
    q = torch.softmax(logits.float() / t, dim=-1)
    if temperature > 0:
        flat = q.reshape(-1, q.shape[-1])
        tok = torch.multinomial(flat, 1, generator=generator).view(q.shape[:-1])
    else:
        tok = logits.argmax(-1)
    return tok, q
