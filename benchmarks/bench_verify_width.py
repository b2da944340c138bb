"""Cost of one target forward by the number of tokens it verifies (T = 1 is a plain decode step), on the
CPU, with the target's linear layers run as harness.targets.native.linear runs them (oneDNN on weights
packed once: "oneDNN") and as plain F.linear (MKL: "MKL").

A speculative step pays for a verify forward of K + 1 tokens (or a tree's nodes); on a GPU that costs
about what a one-token forward costs, on a CPU it does not, and that ratio is what a drafter's tau has to
beat. This prints and writes the median ms per forward for T = 1 .. 8 and 16 after a 300-token prefill,
in both layouts, interleaved forward by forward so that both see the same machine load.

    python benchmarks/bench_verify_width.py --out results/verify-width-cpu [--target smollm2-135m]

Writes <out>/verify_width.json and <out>/verify_width.md, env.json beside them. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

WIDTHS = (1, 2, 3, 4, 5, 6, 8, 16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=15, help="timed forwards per width and setting")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--context", type=int, default=300, help="prefilled tokens before the timed forwards")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from harness.provenance import git_commit
    from harness.records import check_out_dir
    from harness.targets import native
    from harness.targets.loading import load_target

    try:
        check_out_dir(args.out)
    except Exception as e:  # a UserError: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target, device="cpu", dtype="float32", max_len=args.context + 64)
    target.reset(1)
    target.prefill_row(0, torch.randint(0, 1000, (1, args.context)))
    base = target.lengths_host[0]
    packed_linear = native.linear
    mkl_linear = torch.nn.functional.linear

    def one(T: int, packed: bool) -> float:
        native.linear = packed_linear if packed else mkl_linear  # Block and NativeLM look it up at call time
        ids = torch.randint(0, 1000, (1, T))
        t0 = time.perf_counter()
        target.forward(ids)
        dt = time.perf_counter() - t0
        target.lengths, target.lengths_host = torch.tensor([base]), [base]  # drop the verified tokens
        return dt

    times: dict[str, dict[int, list[float]]] = {"oneDNN": {}, "MKL": {}}
    try:
        for T in tqdm(WIDTHS, desc="widths"):
            for _ in range(3):  # warm-up
                one(T, True), one(T, False)
            for _ in range(args.reps):
                for setting in ("oneDNN", "MKL"):
                    times[setting].setdefault(T, []).append(one(T, setting == "oneDNN"))
    finally:
        native.linear = packed_linear
    rows = []
    for T in WIDTHS:
        med = {s: 1000 * statistics.median(times[s][T]) for s in times}
        rows.append(dict(tokens=T, ms_onednn=round(med["oneDNN"], 2), ms_mkl=round(med["MKL"], 2)))
    for r in rows:
        r["onednn_vs_one_token"] = round(r["ms_onednn"] / rows[0]["ms_onednn"], 3)
        r["mkl_vs_one_token"] = round(r["ms_mkl"] / rows[0]["ms_mkl"], 3)
    lines = ["| tokens verified | ms, oneDNN (harness) | ms, MKL (F.linear) | MKL / oneDNN | x one-token forward, oneDNN | MKL |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['ms_onednn']:.1f} | {r['ms_mkl']:.1f} | {r['ms_mkl'] / r['ms_onednn']:.2f} | "
              f"{r['onednn_vs_one_token']:.2f} | {r['mkl_vs_one_token']:.2f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verify_width.json").write_text(json.dumps(dict(target=args.target, context=args.context,
                                                                reps=args.reps, rows=rows), indent=2))
    (args.out / "verify_width.md").write_text(
        f"# One {args.target} forward by tokens verified (CPU, fp32, {args.context}-token context, median of "
        f"{args.reps})\n\n{table}\n")
    env = dict(python=platform.python_version(), torch=torch.__version__, host=platform.node(),
               processor=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               git_commit=git_commit(), command=" ".join(sys.argv), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (args.out / "env.json").write_text(json.dumps(env, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
