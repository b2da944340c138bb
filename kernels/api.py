"""Public entry points: check the inputs once, then run the Triton kernels or the float64 reference.

backend="auto" runs Triton on CUDA tensors and the torch reference elsewhere. backend="triton" on CPU
tensors runs the kernels in Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment
before triton is first imported.
"""

from __future__ import annotations

import os

import torch

from .checks import check_chain, check_tree
from .reference import verify_chain_reference, verify_tree_reference
from .results import ChainResult, TreeResult

BACKENDS = ("auto", "triton", "torch")


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return True


def verify_chain(logits, cu_num_draft, draft_ids, draft_probs, temperature, seeds, positions, *,
                 backend: str = "auto", uniforms=None, noise=None, kmax: int | None = None,
                 stats: bool = True) -> ChainResult:
    """Verify B draft chains against the target in one call.

    logits [N + B, V]: request b owns drafts cu[b] .. cu[b+1]-1 and target rows cu[b]+b .. cu[b+1]+b
    (row j scores the token after draft j-1; the last row gives the bonus token).
    cu_num_draft [B + 1] int64, draft_ids [N] int64, draft_probs [N, V] or None (one-hot drafter),
    temperature [B] (0 = greedy), seeds [B] int64, positions [B] int64 (position of the first draft).
    uniforms [N] / noise [N + B, V]: optional injected accept uniforms / Gumbel noise (tests).
    kmax: an upper bound on every K_b from a trusted caller; skips the checks' one host read (the values
    are then not validated, only shapes, dtypes and devices).
    stats: False when no one reads the per-draft statistics: the torch reference then skips them when
    every request is greedy (argmax comparisons only); the Triton kernel computes them fused regardless.
    """
    inp = check_chain(logits, cu_num_draft, draft_ids, draft_probs, temperature, seeds, positions, uniforms, noise,
                      kmax)
    if _use_triton(backend, inp.logits.device):
        from .chain import verify_chain_triton

        return verify_chain_triton(inp)
    return verify_chain_reference(inp, stats=stats)


def verify_tree(logits, tokens, parents, num_nodes, draft_probs, temperature, seeds, positions, *,
                backend: str = "auto", uniforms=None, noise=None,
                bounds: tuple[int, int] | None = None, stats: bool = True) -> TreeResult:
    """Verify B draft trees (node 0 = root = last emitted token; row n scores the children of node n).

    logits [B, T, V], tokens [B, T], parents [B, T] (parents[:, 0] = -1, parent < child), num_nodes [B],
    draft_probs [B, T, V] or None, temperature/seeds/positions [B] (positions = depth-1 position).
    uniforms [B, T] (accept test of node n) / noise [B, T, V] (draw at row n): optional injection.
    bounds: (max depth, max children of a node) from a trusted caller; skips the checks' host read of the
    tree (its structure is then not validated). stats: as for verify_chain.
    """
    inp = check_tree(logits, tokens, parents, num_nodes, draft_probs, temperature, seeds, positions, uniforms, noise,
                     bounds)
    if _use_triton(backend, inp.logits.device):
        from .tree import verify_tree_triton

        return verify_tree_triton(inp)
    return verify_tree_reference(inp, stats=stats)
