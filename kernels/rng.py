"""Counter-based randomness shared bit for bit by the torch reference and the Triton kernels.

Every random number used by verification is a pure function of (seed, position, token, stream):

    key   = row_key(seed, position, stream)       one 32-bit key per (request, sequence position)
    bits  = token_bits(key, token)                 32 random bits per vocabulary entry
    u     = ((bits >> 9) + 0.5) * 2**-23           uniform in (0, 1), exact in float32 and float64
    g     = -log(-log(u))                          standard Gumbel

The mixing function is the 32-bit finaliser of MurmurHash3 (a bijection with full avalanche),
applied once per absorbed 32-bit word. All arithmetic here is on int64 tensors holding values in
[0, 2**32); products are split into 16-bit halves so nothing overflows int64. The Triton twin lives
in `triton_rng.py` and uses uint32 lanes, whose wrap-around gives the same bits.

Streams: STREAM_ACCEPT keys the accept tests (token = the drafted token), STREAM_DRAW keys the Gumbel
noise of recovered and bonus draws (token = every vocabulary entry). Drafters that sample must use
another seed or a stream >= 2 so their randomness is independent of verification's.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
FMIX_M1 = 0x85EBCA6B
FMIX_M2 = 0xC2B2AE35
GOLDEN = 0x9E3779B9
KEY_SALT = 0x5BD1E995
UNIFORM_SCALE = 2.0**-23

STREAM_ACCEPT = 0
STREAM_DRAW = 1


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2**32 for a in [0, 2**32) held in int64 and a 32-bit constant c."""
    lo = a * (c & 0xFFFF)  # < 2**48
    hi = ((a * (c >> 16)) & 0xFFFF) << 16  # < 2**32
    return (lo + hi) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_M1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_M2)
    return h ^ (h >> 16)


def row_key(seed: torch.Tensor, position: torch.Tensor, stream: int) -> torch.Tensor:
    """32-bit key (in int64) for each (seed, position) pair; seed and position are int64 tensors."""
    seed = seed.to(torch.int64)
    position = position.to(torch.int64)
    h = fmix32((seed & MASK32) ^ KEY_SALT)
    h = fmix32(h ^ ((seed >> 32) & MASK32))
    h = fmix32(h ^ (position & MASK32))
    h = fmix32(h ^ ((position >> 32) & MASK32))
    return fmix32(h ^ stream)


def token_bits(key: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """32 random bits for each (key, token); broadcasts like key ^ token."""
    h = fmix32(key ^ _mul32(token.to(torch.int64) & MASK32, GOLDEN))
    return fmix32((h + key) & MASK32)


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1) as float64; the value is exactly representable in float32."""
    return ((bits >> 9).to(torch.float64) + 0.5) * UNIFORM_SCALE


def uniform(seed: torch.Tensor, position: torch.Tensor, token: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform in (0, 1) (float64) keyed by (seed, position, token, stream); all broadcast together."""
    return bits_to_uniform(token_bits(row_key(seed, position, stream), token))


def gumbel_rows(seed: torch.Tensor, position: torch.Tensor, vocab: int, stream: int = STREAM_DRAW) -> torch.Tensor:
    """Gumbel noise [R, V] (float64) for R rows keyed by seed [R] and position [R]."""
    key = row_key(seed, position, stream)[:, None]  # [R, 1]
    tokens = torch.arange(vocab, device=key.device, dtype=torch.int64)[None, :]  # [1, V]
    u = bits_to_uniform(token_bits(key, tokens))  # [R, V]
    return -torch.log(-torch.log(u))
