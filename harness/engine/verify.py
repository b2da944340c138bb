"""Verification: from the target's logits and a proposal to the emitted tokens.

One entry point for chains and one for trees; both call spec_kernels, whose backend is the Triton
kernel on CUDA and the float64 torch reference on CPU (`--verify-backend triton|torch|auto`).

Random streams: `seeds` [B] holds one key per row (harness.seeds: run seed, prompt, turn,
drafter) and `positions` [B] the sequence position of the row's first draft, so the counter-based RNG
never hands two rows, turns, prompts or steps the same uniforms, and a run is reproducible from its seed.

Statistics for the meter: the Triton kernel computes them fused into verification. The torch reference
computes them in float64 over the whole vocabulary, which on a CPU costs about as much as a verify forward
of a few tokens; at temperature 0 it therefore decides with argmax comparisons only inside the step and
hands back `DeferredStats`, which runs the full reference on the same inputs when materialised: the
scheduler does that right after the step, outside the timed region (so at most one step's inputs are
kept). The full reference decides exactly as the lean path (tests/test_reference_lean.py).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from harness.types import Proposal, VerifyOutput


def _backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


class DeferredStats(MutableMapping):
    """The verifier's statistics, computed by `compute()` when first read; keys set before that (the
    meter's cu_num_draft, path, parents) are kept beside them."""

    def __init__(self, compute):
        self._compute, self._stats, self._extra = compute, None, {}

    def materialize(self) -> None:
        """Computes the statistics now (and drops the kept inputs)."""
        if self._stats is None:
            self._stats, self._compute = dict(self._compute()), None

    def _all(self) -> dict:
        self.materialize()
        return {**self._stats, **self._extra}

    def __getitem__(self, key):
        return self._extra[key] if key in self._extra else self._all()[key]

    def __setitem__(self, key, value):
        self._extra[key] = value

    def __delitem__(self, key):
        raise TypeError("verifier statistics are read-only")

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return len(self._all())


def _deferred(temperature: float, backend: str, stats: bool) -> bool:
    return stats and temperature == 0 and backend == "torch"


def _keys(seeds, B: int, dev) -> torch.Tensor:
    """Row keys [B] int64 from a tensor of keys or one int (all rows the same key: tests, calibration)."""
    if torch.is_tensor(seeds):
        return seeds.to(dev)
    return torch.full((B,), int(seeds), dtype=torch.long, device=dev)


def verify_chain(logits: torch.Tensor, proposal: Proposal, temperature: float, seeds: torch.Tensor,
                 positions: torch.Tensor, backend: str = "auto", stats: bool = True) -> VerifyOutput:
    """logits [B, K+1, V] of the step's forward (row 0 scores draft 1, row K the bonus token);
    seeds [B] int64 row keys; positions [B] sequence position of the first draft (keys the RNG).
    Reads nothing back to the host when the drafter drafted K for every row or gave num_draft_host.
    stats=False: no meter reads the per-draft statistics (the CPU reference then skips them at T = 0)."""
    from spec_kernels import verify_chain as kernel

    B, K1, V = logits.shape
    K = K1 - 1
    dev = logits.device
    if proposal.num_draft is None or K == 0:
        counts = torch.full((B,), K, dtype=torch.long, device=dev)
        rows = logits.reshape(B * K1, V)  # every request drafted K
        draft_ids = proposal.tokens.reshape(-1)
        q = proposal.q.reshape(B * K, V) if proposal.q is not None else None
    else:  # ragged drafts (e.g. ngram): gather each request's K_b + 1 rows
        counts = proposal.num_draft.to(dev)
        k_host = proposal.num_draft_host if proposal.num_draft_host is not None else proposal.num_draft.tolist()
        row_idx = torch.cat([b * K1 + torch.arange(k + 1) for b, k in enumerate(k_host)]).to(dev)
        rows = logits.reshape(B * K1, V).index_select(0, row_idx)
        keep = torch.cat([b * K + torch.arange(k) for b, k in enumerate(k_host)]).to(dev)
        draft_ids = proposal.tokens.reshape(-1).index_select(0, keep)
        q = proposal.q.reshape(B * K, V).index_select(0, keep) if proposal.q is not None else None
    cu = torch.zeros(B + 1, dtype=torch.long, device=dev)
    cu[1:] = torch.cumsum(counts, 0)
    temp = torch.full((B,), float(temperature), dtype=torch.float32, device=dev)
    backend, keys, positions = _backend(backend, dev), _keys(seeds, B, dev), positions.to(dev)
    defer = _deferred(temperature, backend, stats)
    res = kernel(rows, cu, draft_ids, q, temp, keys, positions, backend=backend, kmax=K, stats=stats and not defer)
    if defer:  # the inputs are kept (logits copied: a later forward may reuse their buffer)
        saved = (rows.clone(), cu, draft_ids, None if q is None else q.clone(), temp, keys, positions)
        stats = DeferredStats(lambda: kernel(*saved, backend="torch", kmax=K).stats)
    else:
        stats = dict(res.stats)
    stats["cu_num_draft"] = cu
    return VerifyOutput(emitted=res.emitted, num_accepted=res.num_accepted, error=res.error, stats=stats)


def verify_tree(logits: torch.Tensor, proposal: Proposal, temperature: float, seeds: torch.Tensor,
                positions: torch.Tensor, backend: str = "auto", stats: bool = True) -> VerifyOutput:
    """logits [B, T, V] at every tree node; proposal.tokens/parents [B, T]; positions [B] of depth 1."""
    from spec_kernels import verify_tree as kernel

    B, T, _ = logits.shape
    dev = logits.device
    temp = torch.full((B,), float(temperature), dtype=torch.float32, device=dev)
    num_nodes = proposal.num_nodes if proposal.num_nodes is not None else torch.full((B,), T, dtype=torch.long)
    backend, args = _backend(backend, dev), (logits, proposal.tokens, proposal.parents, num_nodes.to(dev), proposal.q,
                                             temp, _keys(seeds, B, dev), positions.to(dev))
    defer = _deferred(temperature, backend, stats)
    res = kernel(*args, backend=backend, bounds=proposal.bounds, stats=stats and not defer)
    if defer:
        saved = tuple(a.clone() if torch.is_tensor(a) else a for a in args)
        stats = DeferredStats(lambda: kernel(*saved, backend="torch", bounds=proposal.bounds).stats)
    else:
        stats = dict(res.stats)
    stats.update(path=res.path, parents=proposal.parents)  # the meter follows the accepted path
    return VerifyOutput(emitted=res.emitted, num_accepted=res.num_accepted, path=res.path, error=res.error,
                        stats=stats)
