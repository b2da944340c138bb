"""Attention of the native target over its KV cache, through a backend that works on the device.

Every step attends T new queries to S cache slots under a boolean mask [B, 1, T, S] (causal, tree,
ragged batch lengths). The Hq query heads share Hkv key/value heads in groups of G = Hq / Hkv (query head
h reads cache head h // G, as transformers' repeat_kv).

Backends (the same result up to rounding; tests/test_attention.py checks each against `sdpa-gqa`):
  sdpa-gqa        F.scaled_dot_product_attention(mask, enable_gqa): the original call, and the CPU
                  default. On CUDA flash attention takes no mask and the memory-efficient kernel no GQA,
                  so it is cuDNN (which may refuse some lengths) or the math kernel (which upcasts the
                  whole cache in every layer).
  fold            the G query heads of a group folded into the query rows: q [B, Hkv, G*T, D] against the
                  Hkv cache heads as they are (nothing of the cache is copied), the mask tiled G times.
                  Without GQA SDPA may take the memory-efficient kernel (any mask, any length) or cuDNN.
  fold-efficient  fold, SDPA pinned to the memory-efficient kernel (CUDA)
  fold-cudnn      fold, SDPA pinned to cuDNN attention (CUDA, fp16/bf16)
  fold-math       fold, SDPA pinned to its math kernel
  manual          fold, then two matmuls in the model's dtype with the softmax in fp32 on the scores
                  [B, Hkv, G*T, S] only: a math fallback that never upcasts the cache.

`choose_attention` picks the backend at model construction (never inside a step, which may be captured
in a CUDA graph): SPEC_HARNESS_ATTENTION when set (what benchmarks/probe_attention.py recommends), else
`sdpa-gqa` on a CPU, else on CUDA the first of CUDA_PREFERENCE that runs on every shape kind we use and
matches a float32 reference there.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.errors import UserError

BACKENDS = ("sdpa-gqa", "fold", "fold-efficient", "fold-cudnn", "fold-math", "manual")
CUDA_PREFERENCE = ("fold-efficient", "fold-cudnn", "manual", "sdpa-gqa")  # tried in order on CUDA
PINNED = {"fold-efficient": SDPBackend.EFFICIENT_ATTENTION, "fold-cudnn": SDPBackend.CUDNN_ATTENTION,
          "fold-math": SDPBackend.MATH}
ENV = "SPEC_HARNESS_ATTENTION"
# Draft heads attend eagerly over a cache whose length changes from call to call. cuDNN attention builds an
# execution plan for every new shape: on the H200 (bf16, sdpa-gqa, which is cuDNN there) an eagle3 chain of 2
# spent 77 or 155 ms drafting a step, one plan per new key length, against 3 ms once the lengths had been
# seen. So heads take no cuDNN backend on CUDA, whatever the target uses (its fast path has static shapes).
HEAD_PREFERENCE = ("fold-efficient", "manual")
HEAD_ENV = "SPEC_HARNESS_HEAD_ATTENTION"


def fold_queries(q: torch.Tensor, mask: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D] -> [B, Hkv, G*T, D] (row g*T + t: head j*G + g, token t); mask [B, 1, T, S] -> [B, 1, G*T, S]."""
    B, Hq, T, D = q.shape
    return q.reshape(B, Hq // groups, groups * T, D), mask.repeat(1, 1, groups, 1)


def unfold_output(out: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, G*T, D] -> [B, Hq, T, D]."""
    B, Hkv, GT, D = out.shape
    return out.reshape(B, Hkv * groups, GT // groups, D)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # q [B, H, R, D]; k, v [B, H, S, D]; mask [B, 1, R, S]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [B, H, R, S] fp32
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [B, H, R, D]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    """q [B, Hq, T, D]; k, v [B, Hkv, S, D] (cache views); mask [B, 1, T, S] bool -> [B, Hq, T, D]."""
    groups = q.shape[1] // k.shape[1]
    if backend == "sdpa-gqa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
    qf, mf = fold_queries(q, mask, groups)  # [B, Hkv, G*T, D], [B, 1, G*T, S]
    if backend == "manual":
        out = manual_attention(qf, k, v, mf)
    elif backend in PINNED:
        with sdpa_kernel(PINNED[backend]):
            out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf)
    else:  # fold: SDPA picks the kernel
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf)
    return unfold_output(out, groups)


def shape_cases(batch: int, max_len: int, tree: int, prefill: int) -> list[tuple[str, int, int, int]]:
    """(kind, B, T, S) for the shapes the native target attends with: 1-token decode, K+1 verify and
    tree verify on the static span, and a prefill of odd length on an odd span."""
    return [("decode", 1, 1, max_len), ("verify", 1, 6, max_len), ("tree", 1, tree, max_len),
            ("batch-decode", batch, 1, max_len), ("prefill", 1, prefill, prefill + 2)]


def case_inputs(B: int, T: int, S: int, hq: int, hkv: int, d: int, device, dtype, seed: int = 0):
    """Random q, k, v and a mask with ragged committed lengths (row b has S - T - 3 b, at least 0) and, for
    T > 1, a tree-like pattern in the new block (each token sees itself and every other earlier one)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, hq, d, generator=gen).transpose(1, 2)  # [B, Hq, T, D], strided as in the model
    k, v = (torch.randn(B, hkv, S, d, generator=gen) for _ in range(2))  # [B, Hkv, S, D]
    lengths = torch.tensor([max(S - T - 3 * b, 0) for b in range(B)])
    rel = torch.arange(S)[None, :] - lengths[:, None]  # [B, S]
    t = torch.arange(T)
    new = (rel[:, None, :] >= 0) & (rel[:, None, :] <= t[None, :, None])  # [B, T, S] causal
    new &= ((rel[:, None, :] - t[None, :, None]) % 2 == 0) | (rel[:, None, :] == 0)  # drop odd distances: a tree
    mask = ((rel < 0)[:, None, :] | new)[:, None]  # [B, 1, T, S]
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), mask.to(device))


def reference(q, k, v, mask) -> torch.Tensor:
    """float32 attention with the heads repeated: what every backend is compared with."""
    groups = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(groups, dim=1) for x in (k, v))
    return manual_attention(q.float(), kf, vf, mask)


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float64: 1e-6}.get(dtype, 3e-2)


def check_backend(backend: str, device, dtype, hq: int, hkv: int, d: int, max_len: int = 2048) -> str | None:
    """None when `backend` runs every shape kind on this device and matches the reference; else why not."""
    for kind, B, T, S in shape_cases(batch=4, max_len=max_len, tree=min(60, max_len // 2), prefill=157):
        q, k, v, mask = case_inputs(B, T, min(S, max_len), hq, hkv, d, device, dtype)
        try:
            out = attend(q, k, v, mask, backend)
        except RuntimeError as e:
            return f"{kind} B={B} T={T} S={S}: {str(e).splitlines()[0][:200]}"
        err = (out.float() - reference(q, k, v, mask)).abs().max().item()
        if not err <= tolerance(dtype):  # NaN fails too
            return f"{kind} B={B} T={T} S={S}: max difference {err:.3g} from the reference"
    return None


def head_attention(device: torch.device, dtype: torch.dtype, hq: int, hkv: int, d: int) -> str:
    """The backend for a draft head's attention (its key length changes every call; see HEAD_PREFERENCE):
    SPEC_HARNESS_HEAD_ATTENTION when set, `sdpa-gqa` on a CPU, else on CUDA the first of HEAD_PREFERENCE
    that runs every shape kind and matches the float32 reference."""
    return _pick(HEAD_ENV, HEAD_PREFERENCE, device, dtype, hq, hkv, d)


def _pick(env: str, preference: tuple[str, ...], device: torch.device, dtype: torch.dtype, hq: int, hkv: int,
          d: int) -> str:
    forced = os.environ.get(env)
    if forced:
        if forced not in BACKENDS:
            raise UserError(f"{env}={forced} is not an attention backend: use one of {', '.join(BACKENDS)}")
        return forced
    if device.type != "cuda":
        return "sdpa-gqa"
    return _choose_cuda(str(device), dtype, hq, hkv, d, preference)


@functools.lru_cache(maxsize=None)
def _choose_cuda(device: str, dtype: torch.dtype, hq: int, hkv: int, d: int,
                 preference: tuple[str, ...] = CUDA_PREFERENCE) -> str:
    reasons = []
    for backend in preference:
        why = check_backend(backend, torch.device(device), dtype, hq, hkv, d)
        if why is None:
            return backend
        reasons.append(f"{backend}: {why}")
    raise RuntimeError("no attention backend works here: " + "; ".join(reasons))


def choose_attention(device: torch.device, dtype: torch.dtype, hq: int, hkv: int, d: int) -> str:
    """The backend for a model with these heads on this device (see module docstring)."""
    return _pick(ENV, CUDA_PREFERENCE, device, dtype, hq, hkv, d)
