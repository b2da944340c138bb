"""Verification kernels against their torch reference: time per call and the bandwidth bound.

Two ways to run (both need CUDA; without it the tests skip and the script exits with a message):

    pytest benchmarks/bench_kernels.py                       pytest-benchmark, a few representative cases
    python benchmarks/bench_kernels.py --out results/kernels full grid: prints a table, writes
                                                             summary.csv and env.json under --out

Grid: kernel in {chain, tree} x mode in {greedy, sampling} x B in {1, 8, 64} x K in {4, 8} x
V in {49152, 128256, 262144}, bfloat16 logits, one-hot drafts (half of them the row's argmax, so chains
stop at varied depths). A tree has 2K+1 nodes: a chain of K drafts from the root plus one sibling at
every depth. Columns:
    us                 Triton launch path on validated inputs (the four kernels), median GPU time
    us_api             the public call, including its one host read of the sizes (Kmax / tree shape)
    us_torch_eager     float64 reference, eager
    us_torch_compiled  float64 reference under torch.compile (within the time budget, else empty)
    bound_us           logits bytes that must be read once / the device's copy bandwidth
    gbps               logits bytes / us
The bandwidth is measured on the device before the grid (a device-to-device copy of --copy-mib MiB,
bytes read + written per second, median of 10; `--bandwidth-gbps` overrides it) and recorded in
env.json with how it was obtained: never a data-sheet figure.
Timing: warm-up, CUDA events around back-to-back calls, median of the per-call times.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BATCHES = (1, 8, 64)
DRAFTS = (4, 8)
VOCABS = (49152, 128256, 262144)
MODES = ("greedy", "sampling")
KERNELS = ("chain", "tree")
COLUMNS = ("kernel", "mode", "B", "K", "V", "dtype", "us", "us_api", "us_torch_eager", "us_torch_compiled",
           "bound_us", "gbps")


def chain_case(B: int, K: int, V: int, mode: str, dtype: torch.dtype, device: str = "cuda"):
    gen = torch.Generator(device=device).manual_seed(B * 1000 + K * 10 + V)
    R = B * (K + 1)
    logits = (torch.randn((R, V), generator=gen, device=device) * 3).to(dtype)
    cu = torch.arange(B + 1, device=device) * K
    rows = (torch.arange(B * K, device=device) // K) * (K + 1) + torch.arange(B * K, device=device) % K
    best = logits[rows].argmax(-1)
    rand = torch.randint(0, V, (B * K,), generator=gen, device=device)
    drafts = torch.where(torch.rand(B * K, generator=gen, device=device) < 0.5, best, rand)
    temp = torch.full((B,), 0.0 if mode == "greedy" else 1.0, device=device)
    seeds = torch.arange(B, device=device)
    positions = torch.full((B,), 100, dtype=torch.int64, device=device)
    return logits, cu, drafts, None, temp, seeds, positions


def tree_case(B: int, K: int, V: int, mode: str, dtype: torch.dtype, device: str = "cuda"):
    gen = torch.Generator(device=device).manual_seed(B * 1000 + K * 10 + V + 1)
    T = 2 * K + 1
    logits = (torch.randn((B, T, V), generator=gen, device=device) * 3).to(dtype)
    parents = torch.tensor([-1] + list(range(K)) + list(range(K)), device=device)  # chain + a sibling per depth
    parents = parents.expand(B, T).contiguous()
    best = logits.argmax(-1)  # [B, T]
    tokens = torch.randint(0, V, (B, T), generator=gen, device=device)
    par = parents.clamp(min=0)
    on_best = torch.rand((B, T), generator=gen, device=device) < 0.5
    tokens = torch.where(on_best, best.gather(1, par), tokens)
    num_nodes = torch.full((B,), T, device=device)
    temp = torch.full((B,), 0.0 if mode == "greedy" else 1.0, device=device)
    return (logits, tokens, parents, num_nodes, None, temp, torch.arange(B, device=device),
            torch.full((B,), 100, dtype=torch.int64, device=device))


def cuda_time_us(fn, warmup: int = 3, reps: int = 20, max_s: float = 1.0) -> float:
    """Median per-call GPU time in microseconds (each call bracketed by CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    start_wall = time.perf_counter()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
        if time.perf_counter() - start_wall > max_s:
            break
    return statistics.median(times)


def callables(kernel: str, args):
    """(launch path on validated inputs, public API call, reference on validated inputs)."""
    from spec_kernels import verify_chain, verify_tree
    from spec_kernels.checks import check_chain, check_tree
    from spec_kernels.chain import verify_chain_triton
    from spec_kernels.reference import verify_chain_reference, verify_tree_reference
    from spec_kernels.tree import verify_tree_triton

    if kernel == "chain":
        inp = check_chain(*args, None, None)
        return (lambda: verify_chain_triton(inp), lambda: verify_chain(*args, backend="triton"),
                verify_chain_reference, inp)
    inp = check_tree(*args, None, None)
    return (lambda: verify_tree_triton(inp), lambda: verify_tree(*args, backend="triton"),
            verify_tree_reference, inp)


def copy_bandwidth(device: str = "cuda", mib: int = 1024, reps: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy of `mib` MiB (median of `reps`)."""
    n = mib * 2**20
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(reps):
        if src.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times)


def logits_bytes(args) -> int:
    return args[0].numel() * args[0].element_size()


def environment(bandwidth: float, how: str) -> dict:
    import triton

    from harness.provenance import git_commit

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "driver": run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "bandwidth_bound_bytes_per_s": bandwidth,
        "bandwidth_source": how,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in COLUMNS})


def print_table(rows: list[dict]) -> None:
    head = f"{'kernel':6} {'mode':8} {'B':>3} {'K':>2} {'V':>6} {'us':>8} {'api':>8} {'eager':>9} {'compiled':>9} " \
           f"{'bound':>7} {'GB/s':>6}"
    print(head)
    for r in rows:
        print(f"{r['kernel']:6} {r['mode']:8} {r['B']:>3} {r['K']:>2} {r['V']:>6} {r['us']:>8.1f} {r['us_api']:>8.1f} "
              f"{r['us_torch_eager']:>9.1f} {r['us_torch_compiled']:>9.1f} {r['bound_us']:>7.1f} {r['gbps']:>6.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/kernels", help="folder for summary.csv and env.json")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--budget-s", type=float, default=80.0,
                    help="stop starting new measurements after this many seconds (kernel timings come first)")
    ap.add_argument("--compile", choices=["none", "subset", "all"], default="subset",
                    help="torch.compile the reference: subset = chain, K=4, V=128256 only")
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy that measures the bandwidth")
    ap.add_argument("--bandwidth-gbps", type=float, default=None,
                    help="use this bandwidth bound (GB/s, read + written) instead of measuring it")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing to measure (run this on the GPU machine)")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernels: TRITON_INTERPRET=1 would time the interpreter; unset it")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.bandwidth_gbps is not None:
        bandwidth, how = args.bandwidth_gbps * 1e9, "given by --bandwidth-gbps"
    else:
        bandwidth = copy_bandwidth("cuda", args.copy_mib)
        how = f"measured: device-to-device copy of {args.copy_mib} MiB, (read + written) bytes / median time of 10"
    print(f"bandwidth bound {bandwidth / 1e12:.2f} TB/s ({how})")
    (out / "env.json").write_text(json.dumps(environment(bandwidth, how), indent=2) + "\n")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    rows, cases = [], []
    for kernel in KERNELS:
        for mode in MODES:
            for B in BATCHES:
                for K in DRAFTS:
                    for V in VOCABS:
                        make = chain_case if kernel == "chain" else tree_case
                        case_args = make(B, K, V, mode, dtype)
                        launch, api, _, _ = callables(kernel, case_args)
                        bound = logits_bytes(case_args) / bandwidth * 1e6
                        us = cuda_time_us(launch)
                        rows.append(dict(kernel=kernel, mode=mode, B=B, K=K, V=V, dtype=args.dtype, us=us,
                                         us_api=cuda_time_us(api), us_torch_eager=math.nan,
                                         us_torch_compiled=math.nan, bound_us=bound,
                                         gbps=logits_bytes(case_args) / us / 1e3))
                        cases.append(case_args)
                        del case_args
    write_csv(out / "summary.csv", rows)
    for row, case_args in zip(rows, cases):  # eager reference, as the budget allows
        if time.perf_counter() - t0 > args.budget_s:
            break
        _, _, ref, inp = callables(row["kernel"], case_args)
        row["us_torch_eager"] = cuda_time_us(lambda: ref(inp), warmup=1, reps=5, max_s=0.5)
    write_csv(out / "summary.csv", rows)
    if args.compile != "none":
        compiled = {}
        for row, case_args in zip(rows, cases):
            if time.perf_counter() - t0 > args.budget_s:
                break
            if args.compile == "subset" and not (row["kernel"] == "chain" and row["K"] == 4 and row["V"] == 128256):
                continue
            _, _, ref, inp = callables(row["kernel"], case_args)
            fn = compiled.setdefault(row["kernel"], torch.compile(ref, dynamic=True))
            try:
                row["us_torch_compiled"] = cuda_time_us(lambda: fn(inp), warmup=2, reps=5, max_s=0.5)
            except Exception as e:  # torch.compile failing on the reference is a result, not a crash
                print(f"torch.compile of the {row['kernel']} reference failed: {type(e).__name__}: {e}"[:300])
                break
    write_csv(out / "summary.csv", rows)
    print_table(rows)
    print(f"wrote {out / 'summary.csv'} and {out / 'env.json'} in {time.perf_counter() - t0:.0f} s")
    return 0


# pytest-benchmark: representative cases (the grid lives in main()).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA device")
pytestmark = [pytest.mark.gpu, needs_cuda]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", (1, 64))
def test_kernel(benchmark, kernel, mode, B):
    make = chain_case if kernel == "chain" else tree_case
    launch, _, _, _ = callables(kernel, make(B, 4, 128256, mode, torch.bfloat16))

    def call():
        launch()
        torch.cuda.synchronize()

    benchmark.pedantic(call, warmup_rounds=3, rounds=30)


@pytest.mark.parametrize("kernel", KERNELS)
def test_reference_eager(benchmark, kernel):
    make = chain_case if kernel == "chain" else tree_case
    _, _, ref, inp = callables(kernel, make(8, 4, 128256, "sampling", torch.bfloat16))

    def call():
        ref(inp)
        torch.cuda.synchronize()

    benchmark.pedantic(call, warmup_rounds=1, rounds=5)


if __name__ == "__main__":
    sys.exit(main())
