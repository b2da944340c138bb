"""Drafters that run an autoregressive model of their own, with their own KV cache:

- `layerskip`: self-speculation with the target's first L layers plus its final norm and LM head
  (weights shared with the target, a separate cache).
- `model`: an independent draft model sharing the target's tokenizer.

The draft cache holds the committed tokens except `pending` ones (committed but not yet fed). A step
feeds the pending tokens, then its own drafts one by one; afterwards the cache pointer moves back to
the last accepted draft.
"""

from __future__ import annotations

import torch

from harness.drafters.base import Committed, DraftContext, Drafter, sample_or_argmax
from harness.errors import UserError
from harness.targets.base import Target
from harness.types import Proposal


class ARDraftModel(Drafter):
    has_q = True

    def __init__(self, model: Target, name: str):
        self.model = model
        self.name = name

    def begin(self, ctx: DraftContext) -> None:
        B = len(ctx.history)
        self.model.reset(B)
        self.pending = [list(h) for h in ctx.history]  # nothing is in the draft cache yet

    def _feed_pending(self) -> torch.Tensor:
        """Feeds the pending tokens (ragged across the batch) and returns the last logits [B, V]."""
        B = len(self.pending)
        n = [len(p) for p in self.pending]
        if B == 1 or len(set(n)) == 1:
            ids = torch.tensor(self.pending, dtype=torch.long, device=self.model.device)
            logits = self.model.forward(ids).logits[:, -1]
            self.model.commit(torch.tensor(n, device=self.model.device), n)
            return logits
        # ragged: right-pad to the longest, read each sequence's own last row
        T = max(n)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(self.pending):
            ids[b, :len(p)] = torch.tensor(p)
        logits = self.model.forward(ids.to(self.model.device)).logits  # [B, T, V]
        idx = torch.tensor(n, device=logits.device) - 1
        self.model.commit(torch.tensor(n, device=self.model.device), n)
        return logits[torch.arange(B, device=logits.device), idx]

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Proposal:
        B = len(ctx.history)
        logits = self._feed_pending()
        self.pending = [[] for _ in range(B)]
        self.base = self.model.lengths.clone()
        self.base_host = list(self.model.lengths_host) if self.model.lengths_host is not None else None
        toks, qs = [], []
        for j in range(ctx.k):
            # draft j continues the sequence at position base + j: its own stream of the row's key
            tok, q = sample_or_argmax(logits, ctx.temperature, ctx.draft_keys, self.base + j)  # [B], [B, V]
            toks.append(tok)
            qs.append(q)
            if j + 1 < ctx.k:
                logits = self.model.forward(tok[:, None]).logits[:, -1]
                self.model.commit(torch.ones(B, dtype=torch.long, device=self.model.device), [1] * B)
        tokens = torch.stack(toks, 1)  # [B, K]
        self.last_drafts = tokens
        return Proposal(tokens=tokens, q=torch.stack(qs, 1))  # q [B, K, V]

    def observe(self, ctx: DraftContext, committed: Committed) -> None:
        K = ctx.k
        n = committed.num_accepted.to(self.model.device)
        # the draft cache keeps drafts 1..min(n, K-1); the rest of what was committed becomes pending
        kept = [min(a, K - 1) for a in committed.accepted]
        host = None if self.base_host is None else [h + a for h, a in zip(self.base_host, kept)]
        self.model.rollback(self.base + torch.clamp(n, max=K - 1), host)
        for b, em in enumerate(committed.emitted):
            a = committed.accepted[b]
            self.pending[b] = em[K - 1:] if a >= K else em[a:]

    @torch.inference_mode()
    def begin_row(self, ctx: DraftContext, b: int) -> None:
        history = ctx.history[b]
        if len(history) > 1:  # prefill this row alone; the last token stays pending
            self.model.prefill_row(b, torch.tensor([history[:-1]], dtype=torch.long, device=self.model.device))
            self.pending[b] = history[-1:]
        else:
            self.model.prefill_row(b, torch.zeros(1, 0, dtype=torch.long, device=self.model.device))
            self.pending[b] = list(history)

    def keep_rows(self, rows: list[int]) -> None:
        self.model.keep_rows(rows)
        self.pending = [self.pending[r] for r in rows]


def layerskip(target: Target, layers: int, name: str = "layerskip") -> ARDraftModel:
    from harness.targets.native import NativeTarget

    hf_model = getattr(target, "hf_model", None) or getattr(target, "model", None)
    if not 1 <= layers < target.num_layers:
        raise UserError(f"--layerskip-layers must be in 1..{target.num_layers - 1}, got {layers}")
    view = NativeTarget(hf_model, target.tokenizer, f"{target.name}[:{layers}]", max_len=target.max_len,
                        num_layers=layers, static=getattr(target, "static", False))
    return ARDraftModel(view, name)


def check_same_vocab(target: Target, draft: Target) -> None:
    if draft.vocab_size != target.vocab_size:
        raise UserError(f"draft model vocabulary ({draft.vocab_size}) differs from the target's "
                        f"({target.vocab_size}): a draft model must share the target's tokenizer")
    tt, dt = target.tokenizer, draft.tokenizer
    if tt is not None and dt is not None and tt.get_vocab() != dt.get_vocab():
        raise UserError("draft model tokenizer differs from the target's: a draft model must share the "
                        "target's tokenizer")
