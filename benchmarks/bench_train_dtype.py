"""fp32 against bf16 for the two costs of `train-head --data sharegpt` on a CPU: the target's teacher-forced
prefill (feature extraction, `--dtype`) and one optimiser step of the unrolled eagle3 head
(`--mixed-precision bf16`, autocast). On CPUs with bf16 products (AVX512-BF16, AMX: this project's Intel Xeon) they run
several times faster than fp32 ones; the rest of a step (softmax, attention, copies) does not.

    python benchmarks/bench_train_dtype.py [--threads 2] [--repeats 4]

Random token ids and features (the cost does not depend on the values), SmolLM2-135M-Instruct, draft
vocabulary 8192, unroll 3, a batch of 4 sequences of 350 tokens. Prints one JSON line per measurement
(the best of --repeats after one warm-up); run it with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--target", default="smollm2-135m")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from harness.drafters.heads import Frozen, config_for_target, init_head
    from harness.targets import load_target
    from harness.training.train_head import Unrolled, collate

    layers = (1, 14, 26)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, 511), generator=gen)
    for dtype in ("float32", "bfloat16"):
        target = load_target(a.target, backend="native", device="cpu", dtype=dtype)
        target.max_len = 1024

        @torch.inference_mode()
        def prefill():
            target.reset(1)
            target.forward(ids, hidden_layers=layers)

        s = best_of(prefill, a.repeats)
        print(json.dumps(dict(what="teacher-forced prefill", dtype=dtype, tokens=ids.shape[1], s=round(s, 4),
                              tok_s=round(ids.shape[1] / s, 1), threads=a.threads)), flush=True)
    cfg = config_for_target(target, "eagle3", draft_vocab=8192)
    frozen = Frozen.of(target)
    head = init_head(cfg, frozen, 0, torch.ones(cfg.vocab_size))
    model = Unrolled(head, frozen, 3, 1.0, None)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    n = 350
    seqs = [dict(ids=torch.randint(100, 40000, (n + 1,), generator=gen), plen=20,
                 feats=torch.randn(n, 3, cfg.hidden_size, generator=gen).to(torch.bfloat16),
                 p_ids=torch.randint(100, 40000, (n, 32), generator=gen),
                 p_vals=torch.softmax(torch.randn(n, 32, generator=gen), -1).half()) for _ in range(4)]
    batch = collate(seqs, 3)
    for mixed in ("no", "bf16"):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed == "bf16"):
                loss, _ = model(**batch)
            loss.backward()
            opt.step()
            opt.zero_grad()

        s = best_of(step, a.repeats)
        print(json.dumps(dict(what="training step (eagle3, unroll 3)", mixed_precision=mixed, tokens=4 * n,
                              s=round(s, 4), tok_s=round(4 * n / s, 1), threads=a.threads)), flush=True)


if __name__ == "__main__":
    main()
