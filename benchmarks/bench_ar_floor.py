"""How close is our `ar` to one forward per token? Our fast `ar` against the floor and against transformers.

    python benchmarks/bench_ar_floor.py --target smollm2-135m --suite humaneval --limit 4 \
        --max-new-tokens 128 --repeats 3 --device cuda --dtype bfloat16 --out results/ar-floor-h100

Rows, on the same prompts in the same run, each new token greedy and exactly --max-new-tokens per prompt
(EOS ignored, so every row makes the same number of tokens):
  floor        a bare CUDA-graph replay of one 1-token forward of the static native target, N times back
               to back after the prompt's prefill: no sampling, no Python loop, no input copies. The least
               time a token can take at one token per forward.
  floor-compile  the same replay of a graph of the torch.compile'd forward (harness.engine.fast compile mode)
  ar-fast      `ar` through harness.engine.step with harness.engine.fast (one graph replay per step)
  ar-compile   the same with `--fast compile`: the replayed graph holds the torch.compile'd layers
  ar-eager     `ar` through harness.engine.step on the eager native target (what `run --no-fast` measures)
  hf-generate  transformers' generate, greedy, min_new_tokens = max_new_tokens
Method: one warm-up per row (which also captures the graphs), then --repeats rounds over the prompts with
the rows interleaved; the device is synchronised around each timed call (time.perf_counter); medians.
ms/token of ar-* and hf-generate includes the prompt's prefill (one per prompt); step ms (ar-* only) is
the decode loop's own per-step time, prefill excluded, the figure to hold against the floor.
On a CPU there are no graphs: the floor is an eager forward and ar-fast runs eagerly on static shapes.
`--methods` picks a subset (floor and ar-eager are the references of x floor and same as ar-eager).

Prints a table; writes ar_floor.csv (the table), ar_floor_raw.csv (every timed call) and env.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from harness.config import RunConfig
from harness.engine.scheduler import decode
from harness.drafters.ar import AR
from harness.engine.fast import StepGraph, compiled_model, enable_fast
from harness.targets.chat import eos_ids, prompt_ids
from harness.runner import environment
from harness.suites import load_suite
from harness.targets import build_target, load_target
from harness.timing import PHASES, PhaseClock

METHODS = ("floor", "floor-compile", "ar-fast", "ar-compile", "ar-eager", "hf-generate")
GRAPHED = ("floor", "floor-compile", "ar-fast", "ar-compile")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev, fn):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def floor(static, ids: torch.Tensor, n: int, model=None) -> tuple[float, None, None]:
    """Seconds per token of n bare replays of a 1-token forward after the prompt's prefill (`model`: the
    forward to capture, default the static target's own)."""
    static.reset(1)
    static.prefill(ids)
    pool = torch.cuda.graph_pool_handle() if static.device.type == "cuda" else None
    step = StepGraph(static, 1, 1, False, False, (), pool, model=model)
    step(ids[:, -1:], None, None)  # CUDA: warm-up, capture and one replay

    def replays():
        for _ in range(n):
            step.replay()

    secs, _ = timed(static.device, replays)
    return secs / n, None, None


def ar(target, ids: list[int], n: int) -> tuple[float, list[int], float]:
    """Seconds per token (prefill included), the tokens, and the loop's seconds per step (prefill excluded)."""
    clock = PhaseClock(target.device)
    secs, dec = timed(target.device, lambda: decode(target, AR(), ids, max_new_tokens=n, k=1, temperature=0.0,
                                                    seed=0, eos_ids=set(), clock=clock))
    clock.resolve(dec.steps)
    step = sum(sum(s[f"t_{p}"] for p in PHASES) for s in dec.steps) / max(len(dec.steps), 1)
    return secs / n, dec.new_ids, step


def hf_generate(model, ids: torch.Tensor, n: int, pad: int | None) -> tuple[float, list[int], None]:
    secs, out = timed(ids.device, lambda: model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=pad))
    new = out[0, ids.shape[1]:].tolist()
    if len(new) != n:
        raise RuntimeError(f"generate made {len(new)} tokens, not {n}")
    return secs / n, new, None


def summarise(raw: list[dict], graphs: bool, methods=METHODS) -> list[dict]:
    rows = []
    floors = [r["ms_per_token"] for r in raw if r["method"] == "floor"]
    floor_ms = statistics.median(floors) if floors else None
    ref = {(r["prompt"], r["repeat"]): r["tokens"] for r in raw if r["method"] == "ar-eager"}
    for m in methods:
        rs = [r for r in raw if r["method"] == m]
        ms = [r["ms_per_token"] for r in rs]
        steps = [r["step_ms"] for r in rs if r["step_ms"] is not None]
        same = [r["tokens"] == ref[r["prompt"], r["repeat"]] for r in rs
                if r["tokens"] is not None and m != "ar-eager" and (r["prompt"], r["repeat"]) in ref]
        med = statistics.median(ms)
        rows.append(dict(method=m, calls=len(rs), ms_per_token=med, ms_min=min(ms), ms_max=max(ms),
                         tok_s=1000.0 / med, x_floor=med / floor_ms if floor_ms else None,
                         step_ms=statistics.median(steps) if steps else None,
                         same_tokens_as_ar_eager=sum(same) / len(same) if same else None,
                         graphs=graphs and m in GRAPHED))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':13s} {'ms/token':>9s} {'min':>8s} {'max':>8s} {'tok/s':>8s} {'x floor':>8s} "
             f"{'step ms':>8s} {'same as ar-eager':>17s}"]
    for r in rows:
        step = f"{r['step_ms']:8.3f}" if r["step_ms"] is not None else f"{'':8s}"
        same = f"{100 * r['same_tokens_as_ar_eager']:16.0f}%" if r["same_tokens_as_ar_eager"] is not None else ""
        x_floor = f"{r['x_floor']:8.2f}" if r["x_floor"] is not None else f"{'':8s}"
        lines.append(f"{r['method']:13s} {r['ms_per_token']:9.3f} {r['ms_min']:8.3f} {r['ms_max']:8.3f} "
                     f"{r['tok_s']:8.1f} {x_floor} {step} {same}")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--suite", default="humaneval")
    ap.add_argument("--limit", type=int, default=4, help="prompts (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path("results/ar-floor"))
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    args = ap.parse_args(argv)
    methods = [m for m in METHODS if m in args.methods.split(",")]
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {', '.join(sorted(unknown)) or 'empty list'}; choose from {', '.join(METHODS)}")

    n = args.max_new_tokens
    eager = load_target(args.target, backend="native", device=args.device, dtype=args.dtype, max_len=args.max_len)
    dev, model, tok = eager.device, eager.hf_model, eager.tokenizer
    graphs = dev.type == "cuda"
    fast = enable_fast(build_target(model, tok, eager.name, "native", args.max_len))
    fast_compiled = enable_fast(build_target(model, tok, eager.name, "native", args.max_len), mode="compile")
    static = build_target(model, tok, eager.name, "native", args.max_len, static=True)
    static_compiled = compiled_model(static.model)
    prompts = [prompt_ids(tok, [{"role": "user", "content": p.turns[0]}])
               for p in load_suite(args.suite, limit=args.limit)]
    too_long = [len(p) for p in prompts if len(p) + n + 2 > args.max_len]
    if too_long:
        raise SystemExit(f"a prompt of {too_long[0]} tokens + {n} new tokens does not fit --max-len {args.max_len}")
    eos = eos_ids(eager)
    pad = min(eos) if eos else None
    run = {
        "floor": lambda ids, k: floor(static, torch.tensor([ids], device=dev), k),
        "floor-compile": lambda ids, k: floor(static, torch.tensor([ids], device=dev), k, static_compiled),
        "ar-fast": lambda ids, k: ar(fast, ids, k),
        "ar-compile": lambda ids, k: ar(fast_compiled, ids, k),
        "ar-eager": lambda ids, k: ar(eager, ids, k),
        "hf-generate": lambda ids, k: hf_generate(model, torch.tensor([ids], device=dev), k, pad),
    }
    if not graphs:
        print("CUDA graphs are CUDA-only: on this device the floor is an eager forward and ar-fast runs "
              "eagerly on static shapes", file=sys.stderr)
    for m in methods:  # warm-up, not recorded (graphs are captured and layers compiled here)
        t0 = time.perf_counter()
        run[m](prompts[0], min(16, n))
        print(f"warm-up {m}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    raw = []
    for rep in range(args.repeats):
        for i, ids in enumerate(prompts):
            for m in methods:
                secs, tokens, step = run[m](ids, n)
                raw.append(dict(method=m, prompt=i, repeat=rep, prompt_tokens=len(ids), new_tokens=n,
                                ms_per_token=1000.0 * secs, step_ms=None if step is None else 1000.0 * step,
                                tokens=tokens))
            print(f"repeat {rep + 1}/{args.repeats}, prompt {i + 1}/{len(prompts)}", file=sys.stderr)
    rows = summarise(raw, graphs, methods)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "ar_floor.csv", rows)
    write_csv(args.out / "ar_floor_raw.csv", [{k: v for k, v in r.items() if k != "tokens"} for r in raw])
    cfg = RunConfig(target=args.target, device=args.device, dtype=args.dtype, max_len=args.max_len, fast=graphs,
                    command=" ".join(["python"] + sys.argv))
    env = dict(environment(cfg, eager), benchmark="bench_ar_floor", suite=args.suite, prompts=len(prompts),
               max_new_tokens=n, repeats=args.repeats, graphs=graphs)
    (args.out / "env.json").write_text(json.dumps(env, indent=2))
    print(f"{eager.name} on {env['device']} ({env['dtype']}), {len(prompts)} {args.suite} prompts x "
          f"{args.repeats} repeats, {n} new tokens each; medians")
    print(format_table(rows))
    print(f"\n{args.out}/ar_floor.csv, ar_floor_raw.csv, env.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
