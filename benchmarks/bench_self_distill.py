"""Self-distillation throughput (the target answering ShareGPT first turns greedily, as train-head's
self-distilled mode does), optionally against another version of harness/training/distill.py:

    git show 2e4a560:harness/training/distill.py > /tmp/distill_before.py
    python benchmarks/bench_self_distill.py --prompts 32 --max-new-tokens 256 --gen-batch 32 \
        --threads 1 --vs /tmp/distill_before.py

The same prompts (the first --prompts first turns of the seed-0 shuffle whose template plus answer fits
512 tokens) go through each version once, one after the other, on one process (fp32, CPU by default).
Prints answer tokens and tok/s per version and whether both made the same answers. Time it only on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from harness.drafters.heads import default_layers
from harness.targets.chat import eos_ids
from harness.targets.loading import load_target
from harness.training import distill
from harness.training.sharegpt import _template, conversations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vs", help="another distill.py to time beside the current one")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    target = load_target(a.target, device=a.device, dtype="fp32", max_len=512)
    tok = target.tokenizer
    prompts = []
    for _, turns in conversations(0):
        ids = _template(tok, turns[:1], True)
        if len(ids) + a.max_new_tokens <= 512:
            prompts.append(ids)
        if len(prompts) == a.prompts:
            break
    eos = eos_ids(target)  # what train-head's self-distillation stops on
    layers = tuple(default_layers("eagle3", target.num_layers))
    versions = [("current", distill)]
    if a.vs:
        spec = importlib.util.spec_from_file_location("distill_vs", a.vs)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        versions.append((a.vs, other))
    answers = {}
    for name, mod in versions:
        t0 = time.perf_counter()
        data = mod.self_distill(target, prompts, layers, a.max_new_tokens, a.gen_batch, eos, desc=name)
        dt = time.perf_counter() - t0
        tokens = sum(len(d["ids"]) - d["plen"] for d in data)
        answers[name] = [d["ids"] for d in data]
        print(f"{name}: {len(prompts)} prompts, {tokens} answer tokens in {dt:.1f} s, {tokens / dt:.1f} tok/s")
    if a.vs:
        print("same answers:", answers["current"] == answers[a.vs])


if __name__ == "__main__":
    main()
