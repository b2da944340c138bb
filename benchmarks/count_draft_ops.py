"""How many tensor operations a drafter dispatches per step: the host cost that dominates a small model's
step on a GPU, where each operation is a kernel launch (README, "On an H200").

    python benchmarks/count_draft_ops.py [--drafter eagle3|eagle] [--tree DEPTH,TOP_K,TOTAL] [--k 2]

A tiny random-weight target and head (tests/conftest.py's tiny model) decode greedily through the fast
path; every aten operation dispatched inside the drafter's propose() and observe() is counted
(TorchDispatchMode), views included, and printed per call with the most frequent ones. No timing: the
count is the same on any machine, and a CUDA run launches a kernel for each non-view operation.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

VIEWS = {"view", "unsqueeze", "slice", "transpose", "expand", "select", "reshape", "split", "as_strided",
         "_reshape_alias", "permute", "detach", "detach_", "alias", "lift_fresh", "squeeze", "narrow", "t"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> int:
    from conftest import tiny_model
    from test_eagle import random_head

    from harness.drafters.eagle import EagleDrafter, TreeShape
    from harness.engine.fast import enable_fast
    from harness.engine.scheduler import decode
    from harness.targets import build_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafter", choices=("eagle3", "eagle"), default="eagle3")
    ap.add_argument("--tree", default=None, help="DEPTH,TOP_K,TOTAL (default: a chain)")
    ap.add_argument("--k", type=int, default=2, help="chain length")
    ap.add_argument("--new-tokens", type=int, default=60)
    ap.add_argument("--top", type=int, default=15, help="most frequent operations shown")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    target = enable_fast(build_target(tiny_model(), None, "tiny", "native", max_len=512))
    head, frozen = random_head(target, args.drafter, draft_vocab=100 if args.drafter == "eagle3" else 0)
    tree = TreeShape(*(int(x) for x in args.tree.split(","))) if args.tree else None
    drafter = EagleDrafter(head, frozen, args.drafter, tree, 512, target.device)
    counts, calls = {"propose": Count(), "observe": Count()}, Counter()
    for name in counts:
        real = getattr(drafter, name)

        def wrapped(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            with counts[_name]:
                return _real(*a, **kw)

        setattr(drafter, name, wrapped)
    decode(target, drafter, list(range(40, 64)), max_new_tokens=args.new_tokens, k=args.k, temperature=0.0, seed=0,
           eos_ids=set())
    shape = f"tree {args.tree}" if tree else f"chain of {args.k}"
    print(f"{args.drafter}, {shape}: operations per call (views in parentheses)")
    for name, c in counts.items():
        n = max(calls[name], 1)
        total, views = sum(c.ops.values()), sum(v for k, v in c.ops.items() if k in VIEWS)
        print(f"{name:8s} {calls[name]:4d} calls  {total / n:7.1f} ops ({views / n:.1f} views)")
        print("   " + ", ".join(f"{k} {v / n:.1f}" for k, v in c.ops.most_common(args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
