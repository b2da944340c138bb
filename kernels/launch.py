"""Launch planning shared by the chain and tree wrappers: tile sizes, vocabulary chunks, warps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Plan:
    block_v: int  # vocabulary entries per tile (power of two)
    tiles_per_chunk: int  # tiles one program walks
    chunks: int  # programs per row (C)
    c_block: int  # next power of two >= chunks
    num_warps: int  # warps of the vocabulary passes


def make_plan(rows: int, vocab: int, device: torch.device, block_v: int | None = None,
              chunks: int | None = None) -> Plan:
    """Choose tiles so that rows * chunks programs cover the GPU about four times over.

    On the interpreter (CPU) big tiles and one chunk are fastest; tests pass block_v / chunks to walk
    the multi-tile and multi-chunk paths.
    """
    if block_v is None:
        cap = 4096 if device.type == "cuda" else 16384
        block_v = min(cap, triton.next_power_of_2(vocab))
    block_v = max(16, block_v)
    n_tiles = triton.cdiv(vocab, block_v)
    if chunks is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            chunks = min(n_tiles, max(1, triton.cdiv(4 * sms, max(rows, 1))))
        else:
            chunks = 1
    chunks = max(1, min(chunks, n_tiles))
    tiles_per_chunk = triton.cdiv(n_tiles, chunks)
    chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    num_warps = 8 if block_v >= 4096 else 4
    return Plan(block_v, tiles_per_chunk, chunks, triton.next_power_of_2(chunks), num_warps)


def check_interpreter(kernel) -> None:
    """The kernels were imported before TRITON_INTERPRET=1 was set: CPU tensors cannot run them."""
    if type(kernel).__name__ != "InterpretedFunction":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")


def rowmajor(t: torch.Tensor) -> torch.Tensor:
    """Last dimension contiguous (any row stride is fine)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def nonempty(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor the kernels may take a pointer to: t itself, or one element when t is empty."""
    return t if t.numel() else torch.zeros(1, dtype=dtype, device=t.device)
