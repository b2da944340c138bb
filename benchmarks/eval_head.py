"""Held-out greedy acceptance by depth of one or more eagle3 head folders on a ShareGPT features folder's
held-out records (the rule and code train-head logs with: harness.training.train_head._heldout), so heads
from different runs are compared on one set:

    python benchmarks/eval_head.py --features /work/i14c/feat harness/heads/smollm2-135m-eagle3 /work/i14c/head

Prints one JSON line per head (cumulative and conditional acceptance by depth 1..5, all and by mode).
"""

from __future__ import annotations

import argparse
import json

import torch

from harness.drafters.heads import Frozen, load_head
from harness.targets.loading import load_target
from harness.training import features
from harness.training.train_head import Unrolled, _heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("heads", nargs="+")
    ap.add_argument("--features", required=True)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    target = load_target(a.target, device="cpu", dtype="fp32", max_len=512)
    _, held, _ = features.load(a.features, features.MODES, tokenizer=target.tokenizer)
    print(json.dumps(dict(heldout_records=len(held), by_mode={m: sum(s["mode"] == m for s in held) for m in features.MODES})))
    for folder in a.heads:
        head = load_head(folder, target, "eagle3").float()
        print(json.dumps(dict(head=folder, **_heldout(Unrolled(head, Frozen.of(target), 3, 1.0), held))))


if __name__ == "__main__":
    main()
