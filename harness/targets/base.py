"""The Target interface: a model being accelerated, with a preallocated KV cache indexed by position.

Every backend keeps `lengths` [B] (committed cache length per sequence). `forward` writes the K/V of the
T new tokens at slots lengths[b] .. lengths[b] + T - 1 and does not move `lengths`; the runner then
commits what verification kept: a chain moves the pointer (`commit`), a tree first gathers the accepted
path into consecutive slots (`commit_path`). Rejected drafts are never copied or erased: the next
forward overwrites them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [B, T, V]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer l -> [B, T, H], output of decoder layer l


def causal_or_tree_mask(lengths: torch.Tensor, T: int, S: int, tree_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, S]: query t of sequence b sees every committed slot (< lengths[b])
    and the new slots lengths[b] + u for u allowed by the tree mask [B, T, T] (causal when None)."""
    dev = lengths.device
    rel = torch.arange(S, device=dev)[None, :] - lengths[:, None]  # [B, S]: slot index relative to the first new token
    committed = rel < 0  # [B, S]
    t_idx = torch.arange(T, device=dev)
    if tree_mask is None:
        new = (rel[:, None, :] >= 0) & (rel[:, None, :] <= t_idx[None, :, None])  # [B, T, S]
    else:
        inside = (rel >= 0) & (rel < T)  # [B, S]
        gather_idx = rel.clamp(0, T - 1)[:, None, :].expand(-1, T, -1)  # [B, T, S]
        new = torch.gather(tree_mask.bool(), 2, gather_idx) & inside[:, None, :]
    return (committed[:, None, :] | new)[:, None]  # [B, 1, T, S]


class Target(ABC):
    """Common interface of the `native` and `hf` backends (see module docstring)."""

    name: str
    backend: str
    tokenizer: object
    vocab_size: int
    hidden_size: int
    num_layers: int
    device: torch.device
    dtype: torch.dtype
    max_len: int
    lengths: torch.Tensor  # [B] int64

    @abstractmethod
    def reset(self, batch_size: int = 1) -> None:
        """Empties the cache for a batch of `batch_size` sequences."""

    @abstractmethod
    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, hidden_layers: tuple[int, ...] = ()) -> TargetOutput:
        """ids [B, T] new tokens; positions [B, T] (default lengths + arange); tree_mask [B, T, T] bool."""

    def commit(self, n: torch.Tensor) -> None:
        """Chain step: keep the first n[b] new tokens of each sequence (a pointer move)."""
        self.lengths = self.lengths + n.to(self.lengths.device)

    @abstractmethod
    def commit_path(self, slots: torch.Tensor, n: torch.Tensor) -> None:
        """Tree step: slots [B, D] are offsets (from lengths) of the kept nodes in order, n [B] how many."""

    def rollback(self, lengths: torch.Tensor) -> None:
        self.lengths = lengths.to(self.lengths.device).clone()

    def default_positions(self, T: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]  # [B, T]

    def prefill(self, ids: torch.Tensor, hidden_layers: tuple[int, ...] = ()) -> TargetOutput:
        out = self.forward(ids, hidden_layers=hidden_layers)
        self.commit(torch.full_like(self.lengths, ids.shape[1]))
        return out


class TargetProxy(Target):
    """A target that wraps another (`inner`): every attribute it does not define is the inner target's,
    and `lengths` reads and writes through. Wrappers such as the CUDA-graph fast path and the profiler's
    region target subclass it."""

    def __getattr__(self, name):
        if name.startswith("__") or "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def lengths(self) -> torch.Tensor:
        return self.inner.lengths

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self.inner.lengths = value
