"""The drafter protocol. A drafter never holds the target: the runner hands it the committed tokens and
the target hidden states it asked for (`hidden_layers`), and tells it what verification kept.

Life of a drafter over a batched run of B rows (harness.engine; batch 1 is B = 1):
    begin(ctx)                 once, after the first rows were prefilled
    begin_row(ctx, b)          a sequence, or its next turn, joined row b (the target prefilled it)
    propose(ctx) -> Proposal   each step: draft tokens for every row, as chains or trees
    observe(ctx, out)          after verification: what each row committed
    keep_rows(rows)            finished rows left: row i takes what row rows[i] held
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

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
    verify_keys: torch.Tensor | None = None  # [B] int64: each row's verification key (harness.seeds)
    draft_keys: torch.Tensor | None = None  # [B] int64: each row's key for the drafter's own draws
    prefill_hidden: dict[int, torch.Tensor] | None = None  # begin_row: the row's prefill, layer -> [1, P, H]
    want_q: bool = True  # False: greedy verification and no meter, so nothing reads q (a drafter may leave it None)


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
        """A new sequence, or the next turn of one, took row b after the target prefilled that row;
        ctx.history[b] is its context and ctx.prefill_hidden its prefill's hidden states (layer ->
        [1, P, H]). Drafters without per-row state need not override it."""

    def keep_rows(self, rows: list[int]) -> None:
        """Finished sequences left; row i now holds what row rows[i] held (len(rows) rows)."""


def sample_or_argmax(logits: torch.Tensor, temperature: float, keys: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None, stream: int = 2):
    """Returns (token [B, ..], q [B, .., V]): q = softmax(logits / t) with t = temperature, or 1 when greedy
    (the meter reads q at the temperature-1 distribution then; the greedy token is the argmax). At
    temperature > 0 the token is argmax(log q + Gumbel noise keyed by keys [B] and positions [B]):
    an exact draw from q, on the device, from the row's own stream (harness.seeds)."""
    t = temperature if temperature > 0 else 1.0
    q = torch.softmax(logits.float() / t, dim=-1)
    if temperature > 0:
        from harness.seeds import gumbel

        V = q.shape[-1]
        extra = q.shape[1:-1].numel() if q.dim() > 2 else 1
        pos = positions.reshape(-1) if positions.numel() == q.numel() // V else positions.repeat_interleave(extra)
        g = gumbel(keys.repeat_interleave(extra), pos, V, stream)  # [B*extra, V]: positions [B] or [B, ...]
        tok = (torch.log(q).reshape(-1, V) + g).argmax(-1).view(q.shape[:-1])
    else:
        tok = logits.argmax(-1)
    return tok, q
