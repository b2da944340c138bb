"""The Target interface: a model being accelerated, with a preallocated KV cache indexed by position.

Every backend keeps `lengths` [B] (committed cache length per sequence). `forward` writes the K/V of the
T new tokens at slots lengths[b] .. lengths[b] + T - 1 and does not move `lengths`; the runner then
commits what verification kept: a chain moves the pointer (`commit`), a tree first gathers the accepted
path into consecutive slots (`commit_path`). Rejected drafts are never copied or erased: the next
forward overwrites them.

Rows: a batch's rows are independent sequences. `prefill_row(b, ids)` empties row b and prefills it
alone while the other rows keep their state (continuous batching admits a sequence that way), and
`keep_rows(rows)` shrinks the batch (row i takes what row rows[i] held). The cache owns these
operations; nothing outside a target touches its tensors.

`lengths_host` mirrors `lengths` on the host when the caller passes the committed counts it already
read (`commit(n, n_host)`), so a step needs no extra device read to size its attention span.
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

    def commit(self, n: torch.Tensor, n_host: list[int] | None = None) -> None:
        """Chain step: keep the first n[b] new tokens of each sequence (a pointer move). n_host: the same
        counts on the host, when the caller has read them (keeps `lengths_host` without a device read)."""
        self.lengths = self.lengths + n.to(self.lengths.device)
        self._host_add(n_host)

    def _host_add(self, n_host: list[int] | None) -> None:
        if n_host is None:
            self.lengths_host = None
        elif getattr(self, "lengths_host", None) is not None:
            self.lengths_host = [a + b for a, b in zip(self.lengths_host, n_host)]

    def max_length(self) -> int:
        """Longest committed sequence: from the host mirror when it is current, else one device read."""
        host = getattr(self, "lengths_host", None)
        return max(host) if host is not None else int(self.lengths.max())

    def prefill_row(self, b: int, ids: torch.Tensor, hidden_layers: tuple[int, ...] = ()) -> TargetOutput:
        """Empties row b and prefills ids [1, P] into it alone; the other rows are untouched. Backends
        without ragged batches hold one row."""
        if b != 0 or self.lengths.shape[0] != 1:
            from harness.errors import UserError
            raise UserError(f"the {self.backend} backend decodes one sequence at a time: use --backend native "
                            "for --batch-size > 1")
        self.reset(1)
        return self.prefill(ids, hidden_layers) if ids.shape[1] else None

    def keep_rows(self, rows: list[int]) -> None:
        """Finished rows leave: row i takes what row rows[i] held; the batch shrinks to len(rows) rows."""
        if list(rows) != list(range(self.lengths.shape[0])):
            from harness.errors import UserError
            raise UserError(f"the {self.backend} backend decodes one sequence at a time: use --backend native")

    @abstractmethod
    def commit_path(self, slots: torch.Tensor, n: torch.Tensor) -> None:
        """Tree step: slots [B, D] are offsets (from lengths) of the kept nodes in order, n [B] how many."""

    def rollback(self, lengths: torch.Tensor, lengths_host: list[int] | None = None) -> None:
        self.lengths = lengths.to(self.lengths.device).clone()
        self.lengths_host = None if lengths_host is None else list(lengths_host)

    def default_positions(self, T: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]  # [B, T]

    def prefill(self, ids: torch.Tensor, hidden_layers: tuple[int, ...] = ()) -> TargetOutput:
        out = self.forward(ids, hidden_layers=hidden_layers)
        self.commit(torch.full_like(self.lengths, ids.shape[1]), [ids.shape[1]] * ids.shape[0])
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

    @property
    def lengths_host(self) -> list[int] | None:
        return getattr(self.inner, "lengths_host", None)

    @lengths_host.setter
    def lengths_host(self, value: list[int] | None) -> None:
        self.inner.lengths_host = value

    def prefill_row(self, b, ids, hidden_layers=()):
        return self.inner.prefill_row(b, ids, hidden_layers)

    def keep_rows(self, rows):
        self.inner.keep_rows(rows)

    def max_length(self) -> int:
        return self.inner.max_length()
