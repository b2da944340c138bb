"""Peaked-q tree repro: the first emitted token's distribution against the target p.

A root with two children drafted from q without replacement, where q is so peaked that its top entry is
exactly 1.0 in float32 while the other entries stay > 0. The emitted token must follow p.

    python benchmarks/repro_peaked_tree.py --draws 40000 --backend torch
    TRITON_INTERPRET=1 python benchmarks/repro_peaked_tree.py --draws 40000 --backend triton  # CPU: slow

Prints p, the emitted frequencies, the largest absolute gap and the chi-square p-value.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

from spec_kernels.testing import PEAKED_P, fast_interpreter, peaked_tree


def first_tokens(draws: int, backend: str, seed: int = 0, batch: int = 2000) -> torch.Tensor:
    """The first emitted token of each request, computed in batches (a tqdm bar for long runs)."""
    from tqdm import tqdm

    from spec_kernels import verify_tree

    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    args = [a.to(dev) for a in peaked_tree(draws, seed).args()]
    if backend == "triton" and dev == "cpu":
        batch = min(batch, 100)  # the interpreter takes about 0.1 s per request: keep the bar moving
    out = []
    with fast_interpreter():  # no-op unless Triton runs in its interpreter
        for s in tqdm(range(0, draws, batch), desc=f"verify_tree ({backend})", unit="batch", dynamic_ncols=True):
            part = [a[s:s + batch] for a in args]
            out.append(verify_tree(*part, backend=backend).emitted[:, 0].cpu())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=40_000)
    ap.add_argument("--backend", choices=("torch", "triton"), default="torch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # the interpreter evaluates masked lanes too (log 0): numpy warns, results are unaffected
        warnings.filterwarnings("ignore", category=RuntimeWarning)
    from scipy import stats as sps

    tok = first_tokens(args.draws, args.backend, args.seed)
    counts = torch.bincount(tok, minlength=len(PEAKED_P)).double()
    freq = counts / counts.sum()
    p = torch.tensor(PEAKED_P, dtype=torch.float64)
    pval = sps.chisquare(counts.numpy(), (p * counts.sum()).numpy()).pvalue
    print(f"backend {args.backend}, {args.draws} draws")
    print("p        ", " ".join(f"{v:.3f}" for v in p.tolist()))
    print("emitted  ", " ".join(f"{v:.3f}" for v in freq.tolist()))
    print(f"max |emitted - p| = {float((freq - p).abs().max()):.4f}, chi-square p-value {pval:.3g}")


if __name__ == "__main__":
    main()
