"""Input checks shared by both backends: shapes, dtypes and devices, then one host read of the values.

Everything a caller can get wrong raises ValueError with a one-line message. The value checks (cu
monotone, token ids in range, temperatures >= 0, tree parents before children) and the sizes the
outputs need (Kmax, Dmax) come from a single device-to-host copy per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32)


def _shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but logits is on {device}; move all inputs to one device")


@dataclass
class ChainInputs:
    """Validated chain inputs: integer tensors as int64, injected randomness as float32."""

    logits: torch.Tensor  # [N + B, V]
    cu: torch.Tensor  # [B + 1] int64
    draft_ids: torch.Tensor  # [N] int64
    draft_probs: torch.Tensor | None  # [N, V]
    temperature: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    uniforms: torch.Tensor | None  # [N] float32
    noise: torch.Tensor | None  # [N + B, V] float32
    B: int
    N: int
    V: int
    kmax: int


@dataclass
class TreeInputs:
    """Validated tree inputs."""

    logits: torch.Tensor  # [B, T, V]
    tokens: torch.Tensor  # [B, T] int64
    parents: torch.Tensor  # [B, T] int64
    num_nodes: torch.Tensor  # [B] int64
    draft_probs: torch.Tensor | None  # [B, T, V]
    temperature: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    uniforms: torch.Tensor | None  # [B, T] float32
    noise: torch.Tensor | None  # [B, T, V] float32
    depth: torch.Tensor | None  # [B, T] int64 on the CPU (-1 for padding); None from a trusted caller
    B: int
    T: int
    V: int
    dmax: int
    max_children: int


def _common_per_request(B: int, temperature, seeds, positions) -> tuple[torch.Tensor, ...]:
    temperature = _tensor("temperature", temperature)
    seeds = _tensor("seeds", seeds)
    positions = _tensor("positions", positions)
    _shape("temperature", temperature, (B,))
    _shape("seeds", seeds, (B,))
    _shape("positions", positions, (B,))
    _dtype("temperature", temperature, FLOAT_DTYPES)
    _dtype("seeds", seeds, INT_DTYPES)
    _dtype("positions", positions, INT_DTYPES)
    return temperature.float().contiguous(), seeds.long().contiguous(), positions.long().contiguous()


def check_chain(logits, cu_num_draft, draft_ids, draft_probs, temperature, seeds, positions, uniforms,
                noise, kmax: int | None = None) -> ChainInputs:
    logits = _tensor("logits", logits)
    cu = _tensor("cu_num_draft", cu_num_draft)
    draft_ids = _tensor("draft_ids", draft_ids)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_num_draft must be 1-D with B + 1 >= 2 entries, got shape {list(cu.shape)}")
    _dtype("cu_num_draft", cu, INT_DTYPES)
    B = cu.numel() - 1
    if draft_ids.dim() != 1:
        raise ValueError(f"draft_ids must be 1-D [N], got shape {list(draft_ids.shape)}")
    _dtype("draft_ids", draft_ids, INT_DTYPES)
    N = draft_ids.numel()
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N + B, V], got shape {list(logits.shape)}")
    _dtype("logits", logits, FLOAT_DTYPES)
    V = logits.shape[1]
    _shape("logits", logits, (N + B, V))
    if V < 1:
        raise ValueError("logits must have a vocabulary of at least one entry")
    if draft_probs is not None:
        _tensor("draft_probs", draft_probs)
        _shape("draft_probs", draft_probs, (N, V))
        _dtype("draft_probs", draft_probs, FLOAT_DTYPES)
    temperature, seeds, positions = _common_per_request(B, temperature, seeds, positions)
    if uniforms is not None:
        _shape("uniforms", _tensor("uniforms", uniforms), (N,))
        _dtype("uniforms", uniforms, FLOAT_DTYPES)
        uniforms = uniforms.float().contiguous()
    if noise is not None:
        _shape("noise", _tensor("noise", noise), (N + B, V))
        _dtype("noise", noise, FLOAT_DTYPES)
        noise = noise.float()
    _same_device(logits.device, cu_num_draft=cu, draft_ids=draft_ids, draft_probs=draft_probs,
                 temperature=temperature, seeds=seeds, positions=positions, uniforms=uniforms, noise=noise)
    cu = cu.long().contiguous()
    draft_ids = draft_ids.long().contiguous()
    if kmax is not None:  # a trusted caller (the engine) bounds the chain length: no host read
        return ChainInputs(logits, cu, draft_ids, draft_probs, temperature, seeds, positions, uniforms, noise,
                           B, N, V, int(kmax))
    counts = cu[1:] - cu[:-1]
    zero = torch.zeros((), dtype=torch.int64, device=cu.device)
    bad_ids = ((draft_ids < 0) | (draft_ids >= V)).any().long() if N else zero
    facts = torch.stack([
        cu[0], cu[-1], (counts < 0).any().long(), counts.max(), bad_ids,
        (~(temperature >= 0) | torch.isinf(temperature)).any().long(),
    ]).tolist()  # the one host read
    cu0, cu_last, negative, kmax, ids_out, bad_t = facts
    if cu0 != 0 or cu_last != N or negative:
        raise ValueError(f"cu_num_draft must start at 0, never decrease and end at N = {N}; got {cu.tolist()}")
    if ids_out:
        raise ValueError(f"draft_ids must lie in [0, V = {V})")
    if bad_t:
        raise ValueError("temperature must be finite and >= 0 (0 = greedy)")
    return ChainInputs(logits, cu, draft_ids, draft_probs, temperature, seeds, positions, uniforms, noise,
                       B, N, V, int(kmax))


def check_tree(logits, tokens, parents, num_nodes, draft_probs, temperature, seeds, positions, uniforms,
               noise, bounds: tuple[int, int] | None = None) -> TreeInputs:
    logits = _tensor("logits", logits)
    tokens = _tensor("tokens", tokens)
    parents = _tensor("parents", parents)
    num_nodes = _tensor("num_nodes", num_nodes)
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D [B, T, V], got shape {list(logits.shape)}")
    _dtype("logits", logits, FLOAT_DTYPES)
    B, T, V = logits.shape
    if B < 1 or T < 1 or V < 1:
        raise ValueError(f"logits must have B, T, V >= 1, got shape {list(logits.shape)}")
    _shape("tokens", tokens, (B, T))
    _shape("parents", parents, (B, T))
    _shape("num_nodes", num_nodes, (B,))
    _dtype("tokens", tokens, INT_DTYPES)
    _dtype("parents", parents, INT_DTYPES)
    _dtype("num_nodes", num_nodes, INT_DTYPES)
    if draft_probs is not None:
        _tensor("draft_probs", draft_probs)
        _shape("draft_probs", draft_probs, (B, T, V))
        _dtype("draft_probs", draft_probs, FLOAT_DTYPES)
    temperature, seeds, positions = _common_per_request(B, temperature, seeds, positions)
    if uniforms is not None:
        _shape("uniforms", _tensor("uniforms", uniforms), (B, T))
        _dtype("uniforms", uniforms, FLOAT_DTYPES)
        uniforms = uniforms.float()
    if noise is not None:
        _shape("noise", _tensor("noise", noise), (B, T, V))
        _dtype("noise", noise, FLOAT_DTYPES)
        noise = noise.float()
    _same_device(logits.device, tokens=tokens, parents=parents, num_nodes=num_nodes, draft_probs=draft_probs,
                 temperature=temperature, seeds=seeds, positions=positions, uniforms=uniforms, noise=noise)
    tokens = tokens.long().contiguous()
    parents = parents.long().contiguous()
    num_nodes = num_nodes.long().contiguous()
    if bounds is not None:  # a trusted caller (the engine) gives (max depth, max children): no host read
        dmax, max_children = bounds
        return TreeInputs(logits, tokens, parents, num_nodes, draft_probs, temperature, seeds, positions, uniforms,
                          noise, None, B, T, V, int(dmax), int(max_children))
    # The one host read: the tree structure (small) and the temperatures.
    bad_t = (~(temperature >= 0) | torch.isinf(temperature)).long()
    host = torch.cat([parents.reshape(-1), tokens.reshape(-1), num_nodes, bad_t]).cpu()
    par_h = host[: B * T].view(B, T)
    tok_h = host[B * T: 2 * B * T].view(B, T)
    nn_h = host[2 * B * T: 2 * B * T + B]
    if bool(host[2 * B * T + B:].any()):
        raise ValueError("temperature must be finite and >= 0 (0 = greedy)")
    if bool(((nn_h < 1) | (nn_h > T)).any()):
        raise ValueError(f"num_nodes must lie in [1, T = {T}], got {nn_h.tolist()}")
    idx = torch.arange(T)
    valid = idx[None, :] < nn_h[:, None]  # [B, T]
    if bool((par_h[:, 0] != -1).any()):
        raise ValueError("parents[:, 0] must be -1 (node 0 is the root)")
    child = valid.clone()
    child[:, 0] = False
    bad_parent = child & ((par_h < 0) | (par_h >= idx[None, :]))
    if bool(bad_parent.any()):
        raise ValueError("every node n >= 1 below num_nodes must have 0 <= parents[n] < n")
    if bool((child & ((tok_h < 0) | (tok_h >= V))).any()):
        raise ValueError(f"tokens of draft nodes must lie in [0, V = {V})")
    depth = torch.full((B, T), -1, dtype=torch.int64)
    depth[:, 0] = 0
    kids = torch.zeros((B, T), dtype=torch.int64)
    rows = torch.arange(B)
    for n in range(1, T):
        par = par_h[:, n].clamp(min=0)
        on = child[:, n]
        depth[:, n] = torch.where(on, depth[rows, par] + 1, depth[:, n])
        kids[rows[on], par[on]] += 1
    dmax = int(depth.max())
    return TreeInputs(logits, tokens, parents, num_nodes, draft_probs, temperature, seeds, positions, uniforms,
                      noise, depth, B, T, V, dmax, int(kids.max()))
