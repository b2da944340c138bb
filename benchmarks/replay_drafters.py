"""Replays `ar`'s answers from a run folder through the model-free drafters (ngram, suffix) at temperature 0
and predicts their speedup from measured verify-forward times: a check of a run's figures that a busy
machine cannot disturb.

At T = 0 a step accepts the longest drafted path that agrees with the target's greedy answer, so the
accepted drafts per step are exact (what decoding would count). Time per step is modelled as
t_forward(1 + drafted nodes) of the target (fastest of interleaved timed calls after a cached context)
plus the drafter's measured propose time; ar's step is t_forward(1). Verification and host bookkeeping
are not modelled.

    python benchmarks/replay_drafters.py results/<run> --out results/<run>/replay
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from harness.drafters.base import DraftContext
from harness.drafters.ngram import lookup
from harness.drafters.suffix import SuffixDrafter
from harness.records import read_jsonl
from harness.targets.chat import prompt_ids
from harness.suites import load_suite
from harness.targets import load_target


def conversations(run: Path, tokenizer):
    """(prompt_id, category, [(prompt ids, ar's new ids)]) in the run's prompt order."""
    cfg = json.loads((run / "config.json").read_text())
    suite = {p.prompt_id: p for p in load_suite(cfg["suite"], limit=cfg["limit"], per_category=cfg["per_category"])}
    out = []
    for rec in read_jsonl(run / "prompts.jsonl"):
        if rec["drafter"] != "ar":
            continue
        p, messages, turns = suite[rec["prompt_id"]], [], []
        for text, answer, new_ids in zip(p.turns, rec["turns"], rec["output_ids"]):
            messages.append({"role": "user", "content": text})
            turns.append((prompt_ids(tokenizer, messages), new_ids))
            messages.append({"role": "assistant", "content": answer})
        out.append((rec["prompt_id"], rec["category"], turns))
    return out, cfg


def accepted_along(tokens, parents, answer, i) -> int:
    """Drafts accepted at answer position i: the longest root path whose tokens equal answer[i:]."""
    node, a = -1, 0
    while i + a < len(answer):
        nxt = [j for j in range(len(tokens)) if parents[j] == node and tokens[j] == answer[i + a]]
        if not nxt:
            break
        node, a = nxt[0], a + 1
    return a


def replay(convs, name: str, k: int):
    """Per category: [answer tokens, steps, accepted, nodes per step list, draft seconds]."""
    return replay_steps(convs, SuffixDrafter if name == "suffix" else lambda: None, k)


def replay_steps(convs, make, k: int):
    """As replay, for the drafter make() returns (a SuffixDrafter; None: ngram with K = k)."""
    drafter = make()
    stats = defaultdict(lambda: [0, 0, 0, [], 0.0])
    for _, category, turns in convs:
        for ids, answer in turns:
            history = list(ids) + answer[:1]
            ctx = DraftContext(history=[history], k=k, temperature=0.0, seed=0, device=torch.device("cpu"))
            if drafter is not None:
                drafter.begin(ctx)
            s = stats[category]
            i = 1
            while i < len(answer):
                t0 = time.perf_counter()
                if drafter is not None:
                    drafter.sync(ctx)  # index what was committed
                    tokens, parents, _, _ = drafter.tree_for(history, drafter.rows[0])
                else:
                    tokens = lookup(history, k)
                    parents = list(range(-1, len(tokens) - 1))
                s[4] += time.perf_counter() - t0
                a = accepted_along(tokens, parents, answer, i)
                s[1] += 1
                s[2] += a
                s[3].append(len(tokens))
                history.extend(answer[i:i + a + 1])
                i += a + 1
            if drafter is not None:
                drafter.sync(ctx)
            s[0] += len(answer) - 1  # the first token came from the prefill
    return stats


def forward_times(target, sizes, context: list[int], rounds: int = 7) -> dict[int, float]:
    target.reset(1)
    target.prefill(torch.tensor([context]))
    best = {t: math.inf for t in sizes}
    with torch.inference_mode():
        for _ in range(rounds):
            for t in sizes:
                ids = torch.tensor([(context * (t // len(context) + 1))[:t]])
                t0 = time.perf_counter()
                target.forward(ids)
                best[t] = min(best[t], time.perf_counter() - t0)
    target.reset(1)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder with ar's records")
    ap.add_argument("--out", type=Path, required=True, help="folder for replay.csv and replay.md")
    ap.add_argument("--drafters", default="ngram,suffix")
    args = ap.parse_args()
    cfg = json.loads((args.run / "config.json").read_text())
    target = load_target(cfg["target"], backend=cfg["backend"], device="cpu", dtype="float32", max_len=cfg["max_len"])
    convs, cfg = conversations(args.run, target.tokenizer)
    results = {name: replay(convs, name, cfg["k"]) for name in args.drafters.split(",")}
    sizes = sorted({1 + n for r in results.values() for s in r.values() for n in s[3]} | {1})
    context = convs[0][2][0][0][:256]
    tf = forward_times(target, sizes, context)
    rows = []
    for name, per_cat in results.items():
        cats = dict(per_cat)
        cats["all"] = [sum(c[0] for c in per_cat.values()), sum(c[1] for c in per_cat.values()),
                       sum(c[2] for c in per_cat.values()), [n for c in per_cat.values() for n in c[3]],
                       sum(c[4] for c in per_cat.values())]
        for cat, (tokens, steps, acc, nodes, draft_s) in cats.items():
            t_spec = sum(tf[1 + n] for n in nodes) + draft_s
            t_ar = tokens * tf[1]
            rows.append(dict(drafter=name, category=cat, steps=steps, tau=(tokens / steps) if steps else math.nan,
                             accepted_per_step=acc / steps if steps else math.nan,
                             mean_nodes=sum(nodes) / len(nodes) if nodes else 0.0,
                             predicted_speedup=t_ar / t_spec if t_spec else math.nan))
    args.out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    from harness.reports.summary import markdown_table

    df = pd.DataFrame(rows)
    df.to_csv(args.out / "replay.csv", index=False)
    table = markdown_table(["drafter", "category", "steps", "tau", "accepted/step", "nodes/step", "predicted speedup"],
                           [[r["drafter"], r["category"], str(r["steps"]), f"{r['tau']:.2f}",
                             f"{r['accepted_per_step']:.2f}", f"{r['mean_nodes']:.2f}",
                             f"{r['predicted_speedup']:.2f}x"] for r in rows])
    lines = [f"# Replay of ar's answers from {args.run} (T = 0)", "",
             "t_forward(T) ms, fastest of 7 interleaved calls: " + ", ".join(f"{t}: {1000 * v:.1f}" for t, v in tf.items()),
             "", table]
    (args.out / "replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
