"""Triton twin of rng.py: the same MurmurHash3-finaliser counter hash in uint32 lanes.

uint32 multiplication wraps modulo 2**32, which is exactly what rng.py computes with split int64
products, so these functions return the same bits as the torch reference (tests check it bit for bit).
The finaliser rounds are unrolled with static_range rather than called as a helper: a nested jit call
is free on the GPU but costs milliseconds in the interpreter.
"""

import triton
import triton.language as tl


@triton.jit
def row_key(seed, position, STREAM: tl.constexpr):
    """seed, position: int64 scalars -> uint32 key (rng.row_key)."""
    h = (seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x5BD1E995
    for k in tl.static_range(5):
        if k == 1:
            h ^= ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        if k == 2:
            h ^= (position & 0xFFFFFFFF).to(tl.uint32)
        if k == 3:
            h ^= ((position >> 32) & 0xFFFFFFFF).to(tl.uint32)
        if k == 4:
            h ^= STREAM
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
    return h


@triton.jit
def token_uniform(key, token):
    """uint32 key, int token (scalar or block) -> float32 uniform in (0, 1) (rng.uniform)."""
    h = key ^ ((token.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32) * 0x9E3779B9)
    for k in tl.static_range(2):
        if k == 1:
            h += key
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
    return ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
