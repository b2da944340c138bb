"""Host side of one speculative step: a tiny target (hidden 64, 2 layers) makes the device work
negligible, so the time per step is what the harness itself spends around the forward (proposal
bookkeeping, masks, verification call, commit, records). Chains (ngram, K = 4) and EAGLE trees (depth 4,
top-k 3, 9 nodes) at batch 1 and 8, through `spec-harness run` (the path every run takes).

    python benchmarks/bench_step_host.py --out results/step-host-cpu [--label after]

Writes <out>/<label>.json (median and IQR of the per-step time t_draft + t_verify + t_accept + t_other,
in microseconds, per case) and prints a table; env.json beside it. Run it on an otherwise idle machine.
The same artefacts (tiny model folder, tiny head) can be reused by an older checkout to time "before":
    PYTHONPATH=<old checkout> python benchmarks/bench_step_host.py --label before --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CASES = [  # label, drafter, batch size, extra flags
    ("chain B=1", "ngram", 1, []),
    ("chain B=8", "ngram", 8, []),
    ("tree B=1", "eagle", 1, ["--depth", "4", "--top-k", "3", "--total-tokens", "9"]),
    ("tree B=8", "eagle", 8, ["--depth", "4", "--top-k", "3", "--total-tokens", "9"]),
]


def build_artefacts(work: Path) -> tuple[Path, Path]:
    """A tiny Llama folder (byte tokenizer, chat template) and a random EAGLE head for it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import byte_tokenizer

    from harness.drafters.heads import Frozen, config_for_target, init_head, save_head
    from harness.targets import build_target

    model_dir, head_dir = work / "tiny", work / "tiny-eagle"
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                               tie_word_embeddings=True, eos_token_id=257, bos_token_id=256)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = 257
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    target = build_target(model, byte_tokenizer(), str(model_dir), "native", max_len=512)
    frozen = Frozen.of(target)
    save_head(init_head(config_for_target(target, "eagle"), frozen, 1), head_dir, dtype=torch.float32)
    return model_dir, head_dir


def run_case(model_dir: Path, head_dir: Path, drafter: str, batch: int, extra: list[str], out: Path) -> dict:
    run_id = f"{drafter}-b{batch}"
    cmd = [sys.executable, "-m", "harness", "run", "--target", str(model_dir), "--backend", "native",
           "--drafters", drafter, "--suite", "mini", "--per-category", "2", "--max-new-tokens", "48", "--k", "4",
           "--device", "cpu", "--batch-size", str(batch), "--out", str(out), "--run-id", run_id, "--overwrite",
           "--meter", "off", "--head", str(head_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: a tiny model gains nothing from two, and load skews it
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    steps = [json.loads(line) for line in open(out / run_id / "steps.jsonl")]
    us = [1e6 * sum(s[f"t_{p}"] for p in ("draft", "verify", "accept", "other")) for s in steps]
    q = statistics.quantiles(us, n=4)
    return {"median_us": statistics.median(us), "iqr_us": q[2] - q[0], "steps": len(us)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/step-host-cpu"))
    ap.add_argument("--label", default="after")
    ap.add_argument("--reuse", action="store_true", help="reuse the tiny model and head of an earlier call")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case; the one with the lowest median is kept")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "artefacts"
    if args.reuse and (work / "tiny").is_dir():
        model_dir, head_dir = work / "tiny", work / "tiny-eagle"
    else:
        model_dir, head_dir = build_artefacts(work)
    results = {}
    for label, d, b, extra in CASES:
        runs = [run_case(model_dir, head_dir, d, b, extra, work / "runs") for _ in range(args.repeats)]
        ok = [r for r in runs if "error" not in r]
        results[label] = min(ok, key=lambda r: r["median_us"]) if ok else runs[0]  # best of the repeats
    (args.out / f"{args.label}.json").write_text(json.dumps(results, indent=2))
    import torch
    env = dict(python=platform.python_version(), torch=torch.__version__, host=platform.node(),
               processor=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               git_commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
    (args.out / "env.json").write_text(json.dumps(env, indent=2))
    print(f"{'case':12s} {'median us/step':>15s} {'IQR':>8s} {'steps':>6s}   ({args.label})")
    for label, r in results.items():
        if "error" in r:
            print(f"{label:12s} {'unsupported':>15s}   {r['error']}")
        else:
            print(f"{label:12s} {r['median_us']:15.0f} {r['iqr_us']:8.0f} {r['steps']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
