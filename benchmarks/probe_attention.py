"""Which attention kernel runs on this device for the native target's exact shapes, and does it work?

    python benchmarks/probe_attention.py --device cuda --out results/attention-probe

No model is needed: the shapes are SmolLM2-135M's (9 query heads, 3 key/value heads, head dim 64;
`--heads` for another model) on a static span of --max-len slots: 1-token decode, K+1 = 6 verify,
a tree of --tree nodes, a ragged batch decode, and a prefill of odd length on an odd span (the
non-static path), with the masks harness.targets.attention.case_inputs builds.

Candidates: each backend of harness.targets.attention (BACKENDS), and the original call
(`sdpa-gqa`: boolean mask + enable_gqa) pinned to each SDPA kernel (`sdpa-gqa@flash`, `@efficient`,
`@cudnn`, `@math`) to see which of them take it. For each candidate, dtype and shape:
  status     ok, or the first line of its error
  max_diff   largest |difference| from a float32 attention with repeated heads
  us         median time of --reps calls (CUDA events; perf_counter on a CPU)
  fresh_us   one call on a key length no earlier call used (the span trimmed by a length of its own): what
             a backend costs when the length changes every call, as in eager steps and draft heads (cuDNN
             builds an execution plan per new shape: 77 ms a plan on the H200, README "On an H200")
  kernels    the device kernels one call launches (torch.profiler), count and names
  graph      ok when the call captures into a CUDA graph and its replay equals the eager output
Writes probe.csv (one row per candidate, dtype, shape), probe.json (the rows, the environment, what
harness.targets.attention.choose_attention picks here, and the recommendation) and recommend.env
(`SPEC_HARNESS_ATTENTION=<backend>`: the fastest backend, summed over the shapes, that is ok, within
tolerance and capturable on every shape in the first of --dtypes, the runs' dtype, and on CUDA never takes
over FRESH_LIMIT_US on a fresh length), and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from harness.provenance import git_commit
from harness.targets.attention import (BACKENDS, ENV, attend, case_inputs, choose_attention, reference,
                                       shape_cases, tolerance)

SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
COLUMNS = ("candidate", "dtype", "shape", "B", "T", "S", "status", "max_diff", "us", "fresh_us", "n_kernels", "kernels",
           "graph")
FRESH_LIMIT_US = 5000.0  # a backend slower than this on a new key length is not recommended on CUDA
FRESH = itertools.count(1)  # each fresh call trims the span by a length no earlier call used


def candidates() -> dict:
    """name -> fn(q, k, v, mask)."""
    out = {b: (lambda b: lambda q, k, v, m: attend(q, k, v, m, b))(b) for b in BACKENDS}
    for name, kernel in SDPA_KERNELS.items():
        def pinned(q, k, v, m, kernel=kernel):
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=q.shape[1] != k.shape[1])
        out[f"sdpa-gqa@{name}"] = pinned
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_us(fn, dev: torch.device, reps: int) -> float:
    fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def launched_kernels(fn, dev: torch.device) -> list[str] | None:
    """Names of the device kernels one call launches (None on a CPU: there are no kernels to list)."""
    if dev.type != "cuda":
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(dev)
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def graph_check(fn, eager: torch.Tensor, dev: torch.device) -> str:
    if dev.type != "cuda":
        return "n/a (no CUDA)"
    try:
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        sync(dev)
    except RuntimeError as e:
        return "error: " + str(e).splitlines()[0][:160]
    return "ok" if torch.equal(out, eager) else "replay differs from eager"


def fresh_us(fn, case, dev: torch.device) -> float | None:
    """µs of one call on a key length never used before (None when the span is too short to trim)."""
    q, k, v, mask = case
    S = k.shape[2] - next(FRESH)
    if S < q.shape[2]:
        return None
    args = (q, k[:, :, :S], v[:, :, :S], mask[..., :S])  # a cache view, as the draft heads slice theirs
    sync(dev)
    t0 = time.perf_counter()
    fn(*args)
    sync(dev)
    return (time.perf_counter() - t0) * 1e6


def probe_one(fn, case, dev: torch.device, dtype: torch.dtype, reps: int) -> dict:
    q, k, v, mask = case
    call = lambda: fn(q, k, v, mask)  # noqa: E731
    try:
        out = call()
        sync(dev)
    except RuntimeError as e:
        return dict(status="error: " + str(e).splitlines()[0][:200], max_diff=None, us=None, fresh_us=None,
                    n_kernels=None, kernels=None, graph=None)
    diff = (out.float() - reference(q, k, v, mask)).abs().max().item()
    names = launched_kernels(call, dev)
    return dict(status="ok" if diff <= tolerance(dtype) else f"wrong: max difference {diff:.3g}", max_diff=diff,
                us=time_us(call, dev, reps), fresh_us=fresh_us(fn, case, dev),
                n_kernels=None if names is None else len(names),
                kernels=None if names is None else ";".join(dict.fromkeys(n[:80] for n in names)),
                graph=graph_check(call, out, dev))


def recommend(rows: list[dict], dev: torch.device, dtype: str) -> str | None:
    """Fastest backend of BACKENDS that is ok on every shape in `dtype` (on CUDA also capturable, and never
    over FRESH_LIMIT_US on a fresh key length)."""
    total = {}
    for name in BACKENDS:
        mine = [r for r in rows if r["candidate"] == name and r["dtype"] == dtype]
        good = mine and all(r["status"] == "ok" and (dev.type != "cuda" or (
            r["graph"] == "ok" and (r.get("fresh_us") or 0.0) <= FRESH_LIMIT_US)) for r in mine)
        if good:
            total[name] = sum(r["us"] for r in mine)
    return min(total, key=total.get) if total else None


def environment(dev: torch.device) -> dict:
    return dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine(),
                torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if dev.type == "cuda" else None,
                python=platform.python_version(), git_commit=git_commit(), command=" ".join(sys.argv),
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated")
    ap.add_argument("--heads", default="9,3,64", help="query heads, key/value heads, head dim (SmolLM2-135M)")
    ap.add_argument("--max-len", type=int, default=2048, help="static span (the run's --max-len)")
    ap.add_argument("--tree", type=int, default=60, help="tree verify nodes")
    ap.add_argument("--prefill", type=int, default=157, help="prefill length (odd on purpose)")
    ap.add_argument("--batch", type=int, default=16, help="rows of the batched decode")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("results/attention-probe"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    cases = shape_cases(batch=args.batch, max_len=args.max_len, tree=args.tree, prefill=args.prefill)
    rows = []
    grid = [(dtype, c) for dtype in dtypes for c in cases]
    for dtype, (kind, B, T, S) in tqdm(grid, desc="attention probe", unit="shape", dynamic_ncols=True):
        case = case_inputs(B, T, S, hq, hkv, d, dev, dtype)
        for name, fn in candidates().items():
            rows.append(dict(candidate=name, dtype=str(dtype).replace("torch.", ""), shape=kind, B=B, T=T, S=S,
                             **probe_one(fn, case, dev, dtype, args.reps)))
    with open(args.out / "probe.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    try:
        chosen = {str(dt).replace("torch.", ""): choose_attention(dev, dt, hq, hkv, d) for dt in dtypes}
    except RuntimeError as e:
        chosen = {"error": str(e)}
    best = recommend(rows, dev, args.dtypes.split(",")[0])
    info = dict(environment(dev), heads=[hq, hkv, d], max_len=args.max_len, choose_attention=chosen,
                recommended=best, rows=rows)
    (args.out / "probe.json").write_text(json.dumps(info, indent=2))
    (args.out / "recommend.env").write_text(f"{ENV}={best}\n" if best else "")
    print(f"{'candidate':20s} {'dtype':9s} {'shape':13s} {'status':40s} {'diff':>8s} {'us':>8s} {'kern':>5s} graph")
    for r in rows:
        diff = f"{r['max_diff']:8.1e}" if r["max_diff"] is not None else f"{'':8s}"
        us = f"{r['us']:8.1f}" if r["us"] is not None else f"{'':8s}"
        nk = f"{r['n_kernels']:5d}" if r["n_kernels"] is not None else f"{'':5s}"
        print(f"{r['candidate']:20s} {r['dtype']:9s} {r['shape']:13s} {r['status'][:40]:40s} {diff} {us} {nk} "
              f"{r['graph'] or ''}")
    print(f"choose_attention here: {chosen}; recommended (fastest ok everywhere): {best}")
    print(f"wrote {args.out}/probe.csv, probe.json, recommend.env")
    return 0


if __name__ == "__main__":
    sys.exit(main())
