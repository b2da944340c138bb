"""What verify_chain and verify_tree return (both backends return the same types and dtypes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChainResult:
    """emitted [B, Kmax+1] int64: accepted drafts then the recovered or bonus token, padded with -1.
    num_accepted [B] int64. error [B] bool: non-finite target logits (row all -1, num_accepted 0).
    stats: name -> float32 tensor; per draft row [N]: p_draft, q_draft, alpha, entropy_p, entropy_q, kl;
    per request [B]: entropy_p_last, p_emitted, q_emitted.
    """

    emitted: torch.Tensor
    num_accepted: torch.Tensor
    error: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TreeResult:
    """path [B, Dmax+1] int64: accepted node indices (path[:, 0] = 0, the root), padded with -1.
    emitted [B, Dmax+1] int64: accepted drafts then the recovered or bonus token, padded with -1.
    num_accepted [B] int64. error [B] bool.
    stats: per node [B, T] (node n's token judged under its parent's row; NaN at the root and padding):
    p_draft, q_draft, alpha, entropy_p, entropy_q, kl; per request [B]: entropy_p_last, p_emitted,
    q_emitted.
    """

    path: torch.Tensor
    emitted: torch.Tensor
    num_accepted: torch.Tensor
    error: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


DRAFT_STATS = ("p_draft", "q_draft", "alpha", "entropy_p", "entropy_q", "kl")
REQUEST_STATS = ("entropy_p_last", "p_emitted", "q_emitted")
