"""Random streams of a run: one key per (run seed, prompt, turn, drafter) and stream.

Verification's counter-based RNG (spec_kernels.rng) is keyed by (row key, sequence position), and a
drafter that samples draws Gumbel noise keyed by its own row key and the draft's position (and tree
node). So no two rows, turns, prompts or drafters share uniforms, each sequence position consumes its
uniforms once, and a run, resumed or sharded or batched differently, is reproducible from its seed.
"""

from __future__ import annotations

import hashlib

import torch

VERIFY = "verify"
DRAFT = "draft"


def row_key(seed: int, prompt_id, turn: int, drafter: str, stream: str) -> int:
    """A 63-bit key, a stable hash of its parts (the same on every machine and Python process)."""
    text = f"{int(seed)}\x1f{prompt_id!r}\x1f{int(turn)}\x1f{drafter}\x1f{stream}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def gumbel(keys: torch.Tensor, positions: torch.Tensor, vocab: int, stream: int = 2) -> torch.Tensor:
    """Gumbel noise [R, V] (float32) for R rows keyed by keys [R] and positions [R] (a drafter's draws:
    streams >= 2, independent of verification's)."""
    from spec_kernels.rng import gumbel_rows

    return gumbel_rows(keys, positions, vocab, stream).float()
