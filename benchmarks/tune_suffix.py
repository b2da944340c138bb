"""How the suffix drafter's defaults were chosen: `ar`'s greedy answers from tuning runs (prompts no bench
preset measures) are replayed through suffix variants and ngram (benchmarks/replay_drafters.py: exact
accepted drafts at T = 0), each step costed at the measured verify forward of its 1 + n tokens; a second
set of `ar` answers (again disjoint) warms the global trie as a corpus. Prints the predicted speedup over
ar per category for each variant, best last.

    python benchmarks/suffix_corpus.py prompts --out /tmp/sfx  # mini prompts 3-6 of each category; 7-10 + calibration
    python -m harness run --prompts /tmp/sfx/tune.jsonl --drafters ar --meter off --max-new-tokens 64 --k 5 \
        --out /tmp/sfx --run-id heldout-ar
    python -m harness run --prompts /tmp/sfx/corpus.jsonl --drafters ar --meter off --max-new-tokens 64 --k 5 \
        --out /tmp/sfx --run-id corpus-ar
    python benchmarks/tune_suffix.py /tmp/sfx/heldout-ar --corpus-run /tmp/sfx/corpus-ar
    python benchmarks/suffix_corpus.py corpus /tmp/sfx/heldout-ar /tmp/sfx/corpus-ar  # the shipped corpus

(run from the repository root with PYTHONPATH=.:benchmarks). First tuning (MKL linear layers, verify
cost 0.6 + 0.07 n, load average 5): prior 2, global_prior 4, alpha 4, max_nodes 10, min_prob 0.1. After the
oneDNN layers the verify cost was refitted from results/verify-width-cpu/ and this grid rerun over the
proposal's knobs (see SuffixConfig for the result and its conditions).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from replay_drafters import conversations, forward_times, replay_steps

from harness.drafters.suffix import SuffixConfig, SuffixDrafter
from harness.targets import load_target

# The verify cost (verify_overhead, verify_per_node) is measured, not tuned: the fit to
# results/verify-width-cpu/ (harness.drafters.suffix). The grid is over the proposal's own knobs.
GRID = dict(min_prob=(0.02, 0.05, 0.1), prior=(1.0, 2.0), global_prior=(4.0,), alpha=(4.0, 8.0),
            max_nodes=(10, 16))


def predicted(stats: dict, tf: dict[int, float]) -> dict[str, float]:
    """Per category and 'all': ar's time over the drafter's (sum of t_forward(1 + nodes) over its steps)."""
    out, tot_ar, tot_spec = {}, 0.0, 0.0
    for cat, (tokens, steps, acc, nodes, _) in stats.items():
        t_ar, t_spec = tokens * tf[1], sum(tf[1 + n] for n in nodes)
        out[cat] = t_ar / t_spec
        tot_ar, tot_spec = tot_ar + t_ar, tot_spec + t_spec
    out["all"] = tot_ar / tot_spec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder with ar's records (the tuning answers)")
    ap.add_argument("--corpus-run", type=Path, help="a run folder whose ar answers warm the global trie")
    ap.add_argument("--out", type=Path, help="write the table here as JSON")
    args = ap.parse_args()
    cfg = json.loads((args.run / "config.json").read_text())
    target = load_target(cfg["target"], backend=cfg["backend"], device="cpu", dtype="float32", max_len=cfg["max_len"])
    convs, _ = conversations(args.run, target.tokenizer)
    corpus = []
    if args.corpus_run:
        corpus = [ans for _, _, turns in conversations(args.corpus_run, target.tokenizer)[0] for _, ans in turns]
    max_nodes = max(GRID["max_nodes"])
    tf = forward_times(target, list(range(1, max_nodes + 2)), convs[0][2][0][0][:256])
    print("t_forward(T) / t_forward(1): " + ", ".join(f"{t}: {v / tf[1]:.2f}" for t, v in tf.items()))
    rows = [dict(variant="ngram", **predicted(replay_steps(convs, lambda: None, cfg["k"]), tf))]
    keys = list(GRID)
    for values in itertools.product(*GRID.values()):
        sc = SuffixConfig(**dict(zip(keys, values)))
        for name, docs in (("", []), ("+corpus", corpus)) if corpus else (("", []),):
            label = " ".join(f"{k}={v}" for k, v in zip(keys, values)) + name
            stats = replay_steps(convs, lambda: SuffixDrafter(sc, docs), cfg["k"])
            rows.append(dict(variant=label, **predicted(stats, tf)))
    rows.sort(key=lambda r: r["all"])
    cats = [c for c in rows[0] if c != "variant"]
    for r in rows[-25:]:
        print(f"{r['variant']:<90} " + " ".join(f"{c[:5]} {r[c]:.2f}x" for c in cats))
    if args.out:
        args.out.write_text(json.dumps(dict(t_forward=tf, rows=rows), indent=1))


if __name__ == "__main__":
    main()
