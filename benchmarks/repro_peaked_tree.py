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

import torch

P_TARGET = (0.597, 0.133, 0.099, 0.081, 0.060, 0.030)
Q_LOGITS = (30.0, 10.0, 9.0, 8.0, 7.0, 6.0)  # softmax: q[0] == 1.0 in float32, q[1:] ~ 1e-9 > 0


def peaked_problem(draws: int, seed: int = 0, siblings: int = 2):
    """verify_tree arguments for `draws` independent requests of the repro (tokens drawn on the CPU)."""
    V, T = len(P_TARGET), siblings + 1
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor(P_TARGET, dtype=torch.float64)
    q = torch.softmax(torch.tensor(Q_LOGITS), -1)  # float32
    assert float(q[0]) == 1.0 and bool((q[1:] > 0).all())
    logits = torch.zeros(draws, T, V)
    logits[:, 0] = p.log().float()  # the root's row; the children's rows only matter for a bonus draw
    tokens = torch.zeros(draws, T, dtype=torch.int64)
    # siblings without replacement from q (in float64, so the tiny entries are drawn at their true rates)
    tokens[:, 1:] = torch.multinomial(q.double().expand(draws, V), siblings, replacement=False, generator=gen)
    parents = torch.full((draws, T), -1, dtype=torch.int64)
    parents[:, 1:] = 0
    draft_probs = torch.zeros(draws, T, V)
    draft_probs[:, 0] = q
    return (logits, tokens, parents, torch.full((draws,), T), draft_probs, torch.ones(draws),
            torch.arange(draws) + 1000 * seed, torch.zeros(draws, dtype=torch.int64))


def first_tokens(draws: int, backend: str, seed: int = 0, batch: int = 2000) -> torch.Tensor:
    """The first emitted token of each request, computed in batches (a tqdm bar for long runs)."""
    from tqdm import tqdm

    from spec_kernels import verify_tree

    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    args = [a.to(dev) for a in peaked_problem(draws, seed)]
    out = []
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
    from scipy import stats as sps

    tok = first_tokens(args.draws, args.backend, args.seed)
    counts = torch.bincount(tok, minlength=len(P_TARGET)).double()
    freq = counts / counts.sum()
    p = torch.tensor(P_TARGET, dtype=torch.float64)
    pval = sps.chisquare(counts.numpy(), (p * counts.sum()).numpy()).pvalue
    print(f"backend {args.backend}, {args.draws} draws")
    print("p        ", " ".join(f"{v:.3f}" for v in p.tolist()))
    print("emitted  ", " ".join(f"{v:.3f}" for v in freq.tolist()))
    print(f"max |emitted - p| = {float((freq - p).abs().max()):.4f}, chi-square p-value {pval:.3g}")


if __name__ == "__main__":
    main()
