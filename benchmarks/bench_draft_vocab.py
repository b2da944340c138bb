"""Cost of one eagle3 draft step on the CPU against its draft vocabulary N (SmolLM2-135M sizes, fp32, one
thread): the head's layer over its cache, then norm + LM head over N and the scatter to the target's
vocabulary, next to one target decode step. Prints a table and writes results/draft-vocab/draft_vocab.csv.

    python benchmarks/bench_draft_vocab.py [--cache 300] [--reps 200]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from harness.drafters.eagle import EagleDrafter, region_mask
from harness.drafters.heads import Frozen, config_for_target, init_head
from harness.targets import load_target


def median_ms(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=int, default=300, help="committed rows in the caches")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", default="results/draft-vocab")
    a = p.parse_args()
    torch.set_num_threads(1)
    target = load_target("smollm2-135m", backend="native", device="cpu", dtype="float32")
    frozen = Frozen.of(target)
    target.reset(1)
    target.forward(torch.randint(0, 1000, (1, a.cache)))
    target.commit(torch.tensor([a.cache]))
    rows = [dict(what="target decode step (1 token)", N="", ms=median_ms(
        lambda: target.forward(torch.tensor([[5]])), a.reps))]
    for N in (49152, 16384, 8192, 4096):
        head = init_head(config_for_target(target, "eagle3", draft_vocab=N), frozen, 0).eval()
        d = EagleDrafter(head, frozen, "eagle3", None, 2048, target.device)
        d.k_cache = torch.zeros(1, head.cfg.num_kv_heads, d.max_len, head.cfg.head_dim)
        d.v_cache = torch.zeros_like(d.k_cache)
        d.lengths = torch.tensor([a.cache])
        feat = torch.randn(1, 576)
        base = d.lengths
        vis = torch.ones(1, 1, 1, dtype=torch.bool)
        mask = region_mask(base, vis, a.cache + 1)
        pos = base[:, None]

        def step():
            out = d._run(torch.tensor([[5]]), feat[:, None], pos, pos, mask)[:, 0]
            torch.softmax(d._logits(out), -1).argmax(-1)

        rows.append(dict(what="eagle3 draft step", N=N, ms=median_ms(step, a.reps)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "draft_vocab.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["what", "N", "ms"])
        w.writeheader()
        w.writerows([dict(r, ms=round(r["ms"], 3)) for r in rows])
    for r in rows:
        print(f"{r['what']:32s} {str(r['N']):>6s} {r['ms']:8.2f} ms")


if __name__ == "__main__":
    main()
