"""The batch sweep: tok/s per sequence and in total, tau, speedup over ar at the same batch size, and the
cost model's predicted speedup beside the measured one, for each batch size, drafter and K mode.

    python benchmarks/bench_batch.py --target smollm2-135m --suite humaneval --device cuda --out $OUT/batch

Batch sizes 1, 4, 16, 64 on a GPU (1, 2, 4 on a CPU, with fewer prompts and tokens); drafters ar, ngram
and eagle when its head loads (a drafter that cannot decode batches runs at batch size 1 only); K
modes: fixed (--k) and auto (the best predicted K, harness.calibrate). The calibration is measured once,
for every batch size, before the runs, and shared by them (<out>/calibration.json).

Writes <out>/batch_sweep.csv and batch_sweep.md (the table below), env.json, calibration.json, and
the run folders <out>/runs/b<B>-<mode>/ with their raw records and summary.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import pandas as pd
import torch

from harness.reports.summary import batch_summary
from harness.calibrate import calibrate, calibration_prompts, is_tree_drafter, save_calibrations
from harness.config import RunConfig
from harness.drafters import build_drafter, is_peer
from harness.errors import UserError
from harness.engine.fast import enable_fast, enable_fast_drafter, resolve_fast
from harness.runner import run
from harness.reports.summary import markdown_table, write_summary
from harness.targets import load_target
from harness.targets.loading import resolve_device

COLUMNS = ("batch_size", "drafter", "k_mode", "k", "prompts", "new_tokens", "wall_s", "tok_s_total", "tok_s_seq",
           "tau", "speedup_total", "speedup_seq", "predicted_tau", "predicted_speedup", "run")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--suite", default="mini")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="native")
    p.add_argument("--out", type=Path, default=Path("results/batch"))
    p.add_argument("--batch-sizes", type=_ints, default=None, help="default 1,4,16,64 (GPU) or 1,2,4 (CPU)")
    p.add_argument("--drafters", default="ar,ngram,eagle", help="ar always runs (the baseline)")
    p.add_argument("--k", type=int, default=5, help="K of the fixed mode")
    p.add_argument("--k-modes", default="fixed,auto")
    p.add_argument("--limit", type=int, default=None, help="prompts (default 64 on a GPU, 4 on a CPU)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (GPU) or 16 (CPU)")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--calib-repeats", type=int, default=5)
    p.add_argument("--calib-max-new-tokens", type=int, default=None, help="default 64 (GPU) or 16 (CPU)")
    p.add_argument("--calib-k-max", type=int, default=8)
    return p.parse_args(argv)


def probe_drafters(args, target, names: list[str]) -> tuple[dict, list[str]]:
    """name -> drafter for those that load; and notes on skipped or restricted ones."""
    cfg = RunConfig(target=args.target, k=args.k)
    usable, notes = {}, []
    for name in names:
        try:
            drafter = build_drafter(name, target, cfg)
        except (UserError, ImportError, FileNotFoundError) as err:
            notes.append(f"{name}: skipped ({str(err).splitlines()[0]})")
            continue
        usable[name] = drafter
        if not _batchable(name, drafter):
            notes.append(f"{name}: batch size 1 only (it does not decode batches)")
        if is_tree_drafter(drafter):
            notes.append(f"{name}: drafts trees, so it runs with fixed settings only (K auto and the cost "
                         "model are for chains)")
    return usable, notes


def calibrate_all(args, target, drafters: dict, batch_sizes: list[int], path: Path) -> None:
    cals = {}
    prompts = calibration_prompts()
    for name, drafter in drafters.items():
        if name == "ar" or is_tree_drafter(drafter):
            continue
        sizes = batch_sizes if _batchable(name, drafter) else [1]
        print(f"calibrating {name} at batch sizes {sizes} ...", flush=True)
        cals[name] = calibrate(target, drafter, name, batch_sizes=sizes, k_max=max(args.calib_k_max, args.k),
                               prompts=prompts, max_new_tokens=args.calib_max_new_tokens, repeats=args.calib_repeats)
    save_calibrations(path, cals)


def _batchable(name: str, drafter) -> bool:
    """Every drafter of ours decodes batches (harness.engine); the transformers peers do not."""
    return not is_peer(drafter)


def sweep(args) -> pd.DataFrame:
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    sizes = args.batch_sizes or ([1, 4, 16, 64] if gpu else [1, 2, 4])
    args.limit = args.limit or (64 if gpu else 4)
    args.max_new_tokens = args.max_new_tokens or (128 if gpu else 16)
    args.calib_max_new_tokens = args.calib_max_new_tokens or (64 if gpu else 16)
    names = ["ar"] + [d.strip() for d in args.drafters.split(",") if d.strip() and d.strip() != "ar"]
    modes = [m.strip() for m in args.k_modes.split(",") if m.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    calib_path = args.out / "calibration.json"

    target = load_target(args.target, backend=args.backend, device=str(dev), dtype=args.dtype, max_len=args.max_len)
    fast = resolve_fast(None, target)  # calibrate on the path the runs take (CUDA graphs on a GPU)
    if fast:
        target = enable_fast(target)
    drafters, notes = probe_drafters(args, target, names)
    if fast:
        drafters = {n: enable_fast_drafter(d) for n, d in drafters.items()}
    batchable = {n: _batchable(n, d) for n, d in drafters.items()}
    chains = {n: not is_tree_drafter(d) for n, d in drafters.items()}
    if "auto" in modes:  # the cost model is needed for --k auto (and predicts the fixed runs beside it)
        calibrate_all(args, target, drafters, sizes, calib_path)
    del target, drafters
    if gpu:
        torch.cuda.empty_cache()

    frames = []
    for b in sizes:
        for mode in modes:
            names_here = [n for n in batchable if (b == 1 or batchable[n])
                          and (mode == "fixed" or (n != "ar" and chains[n]))]
            if mode == "auto" and not names_here:
                continue
            run_id = f"b{b}-{mode}"
            cfg = RunConfig(target=args.target, backend=args.backend, drafters=tuple(names_here), suite=args.suite,
                            limit=args.limit, max_new_tokens=args.max_new_tokens, k=args.k, device=str(dev),
                            dtype=args.dtype, max_len=args.max_len, out=str(args.out / "runs"), run_id=run_id,
                            overwrite=True, meter=False, warmup=args.warmup, batch_size=b,
                            command=" ".join(shlex.quote(a) for a in sys.argv),
                            extra={"k_auto": mode == "auto", "calibration": str(calib_path)} if "auto" in modes
                            else {"k_auto": False})
            print(f"\n== batch size {b}, K {mode}: {', '.join(names_here)}", flush=True)
            folder = run(cfg)
            write_summary(folder)
            df = batch_summary(folder)
            frames.append(df.assign(k_mode=mode, run=run_id))
    table = pd.concat(frames, ignore_index=True)
    ar = table[(table["drafter"] == "ar")].set_index("batch_size")
    for col, src in (("speedup_total", "tok_s_total"), ("speedup_seq", "tok_s_seq")):
        table[col] = table[src] / table["batch_size"].map(ar[src])
    order = table["drafter"].ne("ar").astype(int) * 2 + table["k_mode"].eq("auto").astype(int)  # ar, fixed, auto
    table = table.assign(_order=order).sort_values(["batch_size", "_order"], kind="stable")
    table = table[list(COLUMNS)].reset_index(drop=True)
    write_outputs(args, table, notes)
    return table


def _num(v, fmt: str, suffix: str = "") -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else format(float(v), fmt) + suffix


def format_sweep(table: pd.DataFrame) -> str:
    headers = ["batch", "drafter", "K", "prompts", "tok/s total", "tok/s per seq", "tau", "speedup total",
               "speedup per seq", "predicted speedup", "predicted tau"]
    rows = [[str(r["batch_size"]), r["drafter"], "-" if r["drafter"] == "ar" else f"{_num(r['k'], '.0f')} ({r['k_mode']})",
             str(r["prompts"]), _num(r["tok_s_total"], ".1f"), _num(r["tok_s_seq"], ".1f"), _num(r["tau"], ".2f"),
             _num(r["speedup_total"], ".2f", "x"), _num(r["speedup_seq"], ".2f", "x"),
             _num(r["predicted_speedup"], ".2f", "x"), _num(r["predicted_tau"], ".2f")]
            for r in table.to_dict("records")]
    return markdown_table(headers, rows)


def write_outputs(args, table: pd.DataFrame, notes: list[str]) -> None:
    table.to_csv(args.out / "batch_sweep.csv", index=False)
    text = format_sweep(table)
    md = [f"# Batch sweep: {args.target} on {args.suite}", "", text, "",
          "tok/s total = all new tokens / wall time of the batched run; tok/s per seq = new tokens / time from "
          "joining to leaving the batch, summed over prompts; speedup = tok/s over ar's at the same batch size; "
          "predicted = harness.calibrate's cost model at the run's K and batch size; tau = tokens per target "
          "forward (bonus included).", ""]
    md += [f"- {n}" for n in notes]
    (args.out / "batch_sweep.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    first = args.out / "runs" / table["run"].iloc[0] / "env.json"
    env = json.loads(first.read_text()) if first.exists() else {}
    env.update(sweep={k: str(v) for k, v in vars(args).items()}, command=" ".join(shlex.quote(a) for a in sys.argv))
    (args.out / "env.json").write_text(json.dumps(env, indent=2), encoding="utf-8")
    print("\n" + text)
    for n in notes:
        print(f"note: {n}")
    print(f"\nwritten: {args.out}/batch_sweep.csv, batch_sweep.md, env.json, calibration.json, runs/")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sweep(args)
    except UserError as err:
        print(f"bench_batch: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
