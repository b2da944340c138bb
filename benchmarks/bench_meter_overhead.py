"""What the information-surplus meter costs: tok/s with the meter off and on, in the same run.

    python benchmarks/bench_meter_overhead.py --target smollm2-135m --suite mini --limit 2 \
        --drafters ngram layerskip --max-new-tokens 64 --repeats 3 --device cpu --out results/_scratch/meter-overhead

End to end: every prompt decoded through the runner's own `run_prompt` (the decode loop the runs use) with
meter=None and with a Meter (n-gram base included, so flush scores ce_base), modes alternating within
each repeat; tok/s = new tokens / decode seconds over the prompts; on/off is the median over repeats of the
paired ratio (target: >= 0.95). One warm-up decode per drafter and mode is not timed.
Micro: Meter.observe per step (µs, device synchronised after the batch of calls) and Meter.flush per
prompt (ms), against the median time of one target forward of K + 1 tokens on a 64-token cache.
The n-gram base: --base FILE, or one fitted (order 3) on the warm-up outputs (target-generated text).

Prints the tables; writes meter_overhead.md, meter_overhead.csv (end to end, one row per drafter and mode),
meter_overhead_raw.csv (every timed prompt), meter_overhead_micro.csv and env.json under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from harness.config import RunConfig
from harness.drafters import build_drafter
from harness.meter.core import Meter
from harness.meter.ngram_base import NgramBase
from harness.targets.chat import eos_ids
from harness.runner import environment, run_prompt
from harness.suites import load_suite
from harness.targets import load_target
from spec_kernels.results import DRAFT_STATS, REQUEST_STATS


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def new_meter(target, cfg: RunConfig, base) -> Meter:
    return Meter(target.device, max_steps=cfg.max_new_tokens + 1, max_depth=max(cfg.k, 8), base=base)


def end_to_end(target, cfg, drafters, prompts, base, repeats: int) -> list[dict]:
    eos = eos_ids(target)
    raw = []
    for name, drafter in drafters.items():
        for rep in range(repeats):
            modes = ("off", "on") if rep % 2 == 0 else ("on", "off")
            for mode in modes:
                for p in prompts:
                    meter = new_meter(target, cfg, base) if mode == "on" else None
                    fields, steps = run_prompt(cfg, target, drafter, p, eos, meter=meter)
                    raw.append(dict(drafter=name, mode=mode, repeat=rep, prompt=p.prompt_id,
                                    tokens=fields["new_tokens"], seconds=fields["wall_s"], steps=len(steps),
                                    metered=sum(1 for s in steps if "h_verify" in s)))
    return raw


def summarise(raw: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["drafter"] for r in raw):
        per_rep = {}
        for r in raw:
            if r["drafter"] == name:
                tok, sec = per_rep.get((r["repeat"], r["mode"]), (0, 0.0))
                per_rep[(r["repeat"], r["mode"])] = (tok + r["tokens"], sec + r["seconds"])
        reps = sorted({rep for rep, _ in per_rep})
        tps = {m: [per_rep[(rep, m)][0] / per_rep[(rep, m)][1] for rep in reps] for m in ("off", "on")}
        ratios = [on / off for on, off in zip(tps["on"], tps["off"])]
        for m in ("off", "on"):
            rows.append(dict(drafter=name, mode=m, repeats=len(reps), tok_s=statistics.median(tps[m]),
                             tok_s_min=min(tps[m]), tok_s_max=max(tps[m]),
                             on_over_off=statistics.median(ratios) if m == "on" else None,
                             ratio_min=min(ratios) if m == "on" else None,
                             ratio_max=max(ratios) if m == "on" else None))
    return rows


def micro(target, cfg: RunConfig, base, calls: int = 2000) -> list[dict]:
    dev, K = target.device, cfg.k
    g = torch.Generator().manual_seed(0)
    stats = {k: torch.rand(K, generator=g).to(dev) for k in DRAFT_STATS}          # [K] per draft row
    stats.update({k: torch.rand(1, generator=g).to(dev) for k in REQUEST_STATS})  # [1] per request
    cu = torch.tensor([0, K], device=dev)
    acc = torch.tensor([K // 2], device=dev)
    meter = new_meter(target, cfg, base)
    steps = cfg.max_new_tokens                                       # one prompt's worth of steps at most
    meter.begin(1)
    for _ in range(20):                                              # warm-up
        meter.observe(stats, cu, acc, True)
    observe_s = []
    for _ in range(max(1, calls // steps)):
        meter.begin(1)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            meter.observe(stats, cu, acc, True)
        sync(dev)
        observe_s.append((time.perf_counter() - t0) / steps)
    ids = torch.randint(0, target.vocab_size, (steps * (K // 2 + 1),), generator=g).tolist()
    flush_s = []
    for _ in range(5):
        meter.begin(1)
        for _ in range(steps):
            meter.observe(stats, cu, acc, True)
        sync(dev)
        t0 = time.perf_counter()
        meter.flush([ids], [ids[:32]])
        flush_s.append(time.perf_counter() - t0)
    fwd_s = []
    target.reset(1)
    target.prefill(torch.randint(0, target.vocab_size, (1, 64), generator=g).to(dev))
    x = torch.randint(0, target.vocab_size, (1, K + 1), generator=g).to(dev)
    with torch.inference_mode():
        for i in range(7):
            sync(dev)
            t0 = time.perf_counter()
            target.forward(x)
            sync(dev)
            if i >= 2:
                fwd_s.append(time.perf_counter() - t0)
    obs, fl, fw = statistics.median(observe_s), statistics.median(flush_s), statistics.median(fwd_s)
    return [dict(what="Meter.observe per step", ms=1e3 * obs, ms_min=1e3 * min(observe_s), ms_max=1e3 * max(observe_s)),
            dict(what=f"Meter.flush per prompt ({steps} steps)", ms=1e3 * fl, ms_min=1e3 * min(flush_s),
                 ms_max=1e3 * max(flush_s)),
            dict(what=f"target forward of {K + 1} tokens", ms=1e3 * fw, ms_min=1e3 * min(fwd_s),
                 ms_max=1e3 * max(fwd_s)),
            dict(what="predicted on/off (observe + flush/steps per forward)", ms=None, ms_min=None, ms_max=None,
                 ratio=fw / (fw + obs + fl / steps))]


def fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def tables(rows: list[dict], micro_rows: list[dict]) -> str:
    lines = ["| drafter | meter | repeats | tok/s (median) | min | max | on/off (median of paired ratios) [min, max] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = ("" if r["on_over_off"] is None
                 else f"{r['on_over_off']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]")
        lines.append(f"| {r['drafter']} | {r['mode']} | {r['repeats']} | {r['tok_s']:.2f} | {r['tok_s_min']:.2f} | "
                     f"{r['tok_s_max']:.2f} | {ratio} |")
    lines += ["", "| micro | ms (median) | min | max | on/off |", "|---|---|---|---|---|"]
    for m in micro_rows:
        lines.append(f"| {m['what']} | {fmt(m['ms'], '.4f')} | {fmt(m['ms_min'], '.4f')} | {fmt(m['ms_max'], '.4f')} | "
                     f"{fmt(m.get('ratio'), '.4f')} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--suite", default="mini")
    ap.add_argument("--limit", type=int, default=2, help="prompts")
    ap.add_argument("--drafters", nargs="+", default=["ngram", "layerskip"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--base", help="n-gram base file (default: fit one on the warm-up outputs)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a busy CPU)")
    ap.add_argument("--out", default="results/_scratch/meter-overhead")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = RunConfig(target=args.target, suite=args.suite, k=args.k, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, device=args.device, dtype=args.dtype, meter=True,
                    command="python benchmarks/bench_meter_overhead.py " + " ".join(argv or []))
    target = load_target(args.target, backend="auto", device=args.device, dtype=args.dtype, max_len=1024)
    prompts = load_suite(args.suite, limit=args.limit)
    drafters = {name: build_drafter(name, target, cfg) for name in args.drafters}
    eos = eos_ids(target)
    outputs = []
    for drafter in drafters.values():                               # warm-up, both modes, untimed
        for meter in (None, new_meter(target, cfg, None)):
            fields, _ = run_prompt(cfg, target, drafter, prompts[0], eos, meter=meter)
            outputs.extend(fields["output_ids"])
    base = NgramBase.load(args.base) if args.base else NgramBase.fit(outputs, order=3, vocab_size=target.vocab_size)

    raw = end_to_end(target, cfg, drafters, prompts, base, args.repeats)
    rows = summarise(raw)
    micro_rows = micro(target, cfg, base)
    text = tables(rows, micro_rows)
    print(text, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    method = __doc__.split("\n\n")[2]
    (out / "meter_overhead.md").write_text(f"# Meter overhead\n\n{method}\n\n{text}", encoding="utf-8")
    write_csv(out / "meter_overhead.csv", rows)
    write_csv(out / "meter_overhead_raw.csv", raw)
    write_csv(out / "meter_overhead_micro.csv", micro_rows)
    (out / "env.json").write_text(json.dumps(environment(cfg, target), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
