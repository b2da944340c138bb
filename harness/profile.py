"""`spec-harness profile`: a short decode under torch.profiler, in regions named like the step phases.

    spec-harness profile --target smollm2-135m --drafter layerskip --steps 32 --out results/profile

Writes DIR/trace.json (a Chrome trace: open it in chrome://tracing or https://ui.perfetto.dev),
DIR/phase_times.csv (time per region, also printed) and DIR/profile.json (what ran where, the same
environment fields as a run's env.json, and the workload's totals).

Regions (torch.profiler.record_function), nested as they run:
    draft, verify, accept, other  the per-step phases of harness.engine.step: the names harness.timing records
                                  in steps.jsonl (t_draft, ...), in the same order
    cache update                  commit / commit_path / rollback / reset of the target's cache and of a
                                  drafter's own model cache (inside accept, draft or other)
    prefill                       the target's prefill of each prompt
    host                          Python bookkeeping around each prompt: chat template and tokenising
                                  before, detokenising after
The workload decodes the first turn of the suite's first prompts in turn until --steps target forwards
are done, after one unprofiled warm-up of the same workload (which also captures the fast path's graphs).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from harness.config import RunConfig
from harness.records import check_out_dir
from harness.errors import UserError
from harness.engine.fast import add_fast_flags, fast_fields
from harness.targets.base import Target, TargetProxy
from harness.timing import PHASES, PhaseClock

CACHE_UPDATE, PREFILL, HOST = "cache update", "prefill", "host"
REGIONS = PHASES + (CACHE_UPDATE, PREFILL, HOST)


class RegionClock(PhaseClock):
    """The decode loop's phase clock, which also keeps a profiler region open over each phase. A region's
    name must be known when it opens, so it is the next phase in PHASES order, checked at each mark."""

    def __init__(self, device):
        super().__init__(device)
        self._next = 0
        self._region: record_function | None = None

    def _open(self) -> None:
        self._region = record_function(PHASES[self._next])
        self._region.__enter__()

    def start(self) -> None:
        super().start()
        self._next = 0
        self._open()

    def mark(self, phase: str) -> None:
        if phase != PHASES[self._next]:
            raise RuntimeError(f"decode marked phase '{phase}' where '{PHASES[self._next]}' was expected: "
                               "harness.profile assumes the phases run in harness.timing.PHASES order")
        super().mark(phase)
        self._region.__exit__(None, None, None)
        self._next += 1
        if self._next < len(PHASES):
            self._open()


class RegionTarget(TargetProxy):
    """A target (or a drafter's model) whose cache updates and prefill run inside named regions."""

    def __init__(self, inner: Target):
        self.inner = inner

    def forward(self, ids, positions=None, tree_mask=None, hidden_layers=()):
        return self.inner.forward(ids, positions, tree_mask, hidden_layers)

    def prefill(self, ids, hidden_layers=()):
        with record_function(PREFILL):
            return self.inner.prefill(ids, hidden_layers)

    def reset(self, batch_size: int = 1) -> None:
        with record_function(CACHE_UPDATE):
            self.inner.reset(batch_size)

    def prefill_row(self, b, ids, hidden_layers=()):
        with record_function(PREFILL):
            return self.inner.prefill_row(b, ids, hidden_layers)

    def keep_rows(self, rows) -> None:
        with record_function(CACHE_UPDATE):
            self.inner.keep_rows(rows)

    def commit(self, n, n_host=None) -> None:
        with record_function(CACHE_UPDATE):
            self.inner.commit(n, n_host)

    def commit_path(self, slots, n, n_host=None) -> None:
        with record_function(CACHE_UPDATE):
            self.inner.commit_path(slots, n, n_host)

    def rollback(self, lengths, lengths_host=None) -> None:
        with record_function(CACHE_UPDATE):
            self.inner.rollback(lengths, lengths_host)


def workload(target, drafter, prompts, cfg: RunConfig, steps: int, eos: set[int]) -> dict:
    """Decodes prompts in turn until `steps` target forwards are done; returns totals."""
    from harness.engine.scheduler import decode
    from harness.targets.chat import prompt_ids

    done = new_tokens = 0
    t0 = time.perf_counter()
    clock = RegionClock(target.device)
    phase_s = dict.fromkeys(PHASES, 0.0)
    for p in itertools.islice(itertools.cycle(prompts), steps + len(prompts)):  # bounded if EOS comes first
        if done >= steps:
            break
        with record_function(HOST):
            ids = prompt_ids(target.tokenizer, [{"role": "user", "content": p.turns[0]}])
        if len(ids) + steps + cfg.k + 2 > target.max_len:
            raise UserError(f"prompt {p.prompt_id} needs more than --max-len {target.max_len} cache slots")
        dec = decode(target, drafter, ids, max_new_tokens=steps - done + 1, k=cfg.k, temperature=cfg.temperature,
                     seed=cfg.seed, eos_ids=eos, verify_backend=cfg.verify_backend, clock=clock)
        clock.resolve(dec.steps)  # CUDA: one sync per prompt, as in a run
        with record_function(HOST):
            target.tokenizer.decode(dec.new_ids, skip_special_tokens=True)
        done += len(dec.steps)
        new_tokens += len(dec.new_ids)
        for s in dec.steps:
            for ph in PHASES:
                phase_s[ph] += s[f"t_{ph}"]
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    return dict(steps=done, new_tokens=new_tokens, wall_s=time.perf_counter() - t0, clock_s=phase_s)


def phase_table(events, clock_s: dict[str, float]) -> list[dict]:
    """Per region: calls, host time (inclusive: the region open on the CPU), device time of the kernels
    launched inside it (CUDA), and the harness's own phase clock (the four phases)."""
    rows = {name: dict(region=name, calls=0, cpu_ms=0.0, device_ms=0.0) for name in REGIONS}
    for e in events:
        if e.name in rows and e.device_type == torch.autograd.DeviceType.CPU:
            r = rows[e.name]
            r["calls"] += 1
            r["cpu_ms"] += e.cpu_time_total / 1000.0
            r["device_ms"] += getattr(e, "device_time_total", 0.0) / 1000.0
    step_ms = sum(rows[p]["cpu_ms"] for p in PHASES) or 1.0
    for r in rows.values():
        r["cpu_us_per_call"] = 1000.0 * r["cpu_ms"] / r["calls"] if r["calls"] else 0.0
        r["share_of_steps"] = r["cpu_ms"] / step_ms
        r["clock_ms"] = 1000.0 * clock_s[r["region"]] if r["region"] in clock_s else None
    return list(rows.values())


def format_phase_table(rows: list[dict], device_type: str) -> str:
    head = f"{'region':14s} {'calls':>6s} {'host ms':>10s} {'us/call':>9s} {'of steps':>9s} {'clock ms':>9s}"
    head += f" {'device ms':>10s}" if device_type == "cuda" else ""
    lines = [head]
    for r in rows:
        clock = f"{r['clock_ms']:9.1f}" if r["clock_ms"] is not None else f"{'':9s}"
        line = (f"{r['region']:14s} {r['calls']:6d} {r['cpu_ms']:10.1f} {r['cpu_us_per_call']:9.1f} "
                f"{100 * r['share_of_steps']:8.1f}% {clock}")
        lines.append(line + (f" {r['device_ms']:10.2f}" if device_type == "cuda" else ""))
    return "\n".join(lines)


def profile_run(cfg: RunConfig, drafter_name: str, steps: int, out: Path) -> list[dict]:
    from harness.drafters import build_drafter, is_peer
    from harness.engine.fast import enable_fast, enable_fast_drafter, precapture, resolve_fast
    from harness.targets.chat import eos_ids
    from harness.runner import environment
    from harness.suites import load_suite
    from harness.targets import load_target

    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    check_out_dir(out)
    prompts = load_suite(cfg.suite, limit=cfg.limit)
    if not prompts:
        raise UserError(f"suite '{cfg.suite}' selected no prompts")
    target = load_target(cfg.target, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype, max_len=cfg.max_len)
    cfg.fast = resolve_fast(cfg.fast, target)
    if cfg.fast:
        target = enable_fast(target, mode=cfg.fast_mode)
    drafter = build_drafter(drafter_name, target, cfg)
    if is_peer(drafter):
        raise UserError(f"{drafter_name} is transformers' own generate: it has no steps to profile; choose one "
                        "of our drafters (ar, ngram, layerskip, model, eagle, eagle3)")
    if cfg.fast:
        drafter = enable_fast_drafter(drafter, cfg.fast_mode)
    eos = eos_ids(target)
    workload(target, drafter, prompts, cfg, min(steps, 16), eos)  # warm-up: lazy init, graph capture
    if cfg.fast:
        precapture(target, [drafter], cfg.k)
    if isinstance(getattr(drafter, "model", None), Target):
        drafter.model = RegionTarget(drafter.model)
    target = RegionTarget(target)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if target.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        totals = workload(target, drafter, prompts, cfg, steps, eos)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    rows = phase_table(prof.events(), totals["clock_s"])
    with open(out / "phase_times.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    info = dict(environment(cfg, target), drafter=drafter_name, k=cfg.k, suite=cfg.suite,
                steps=totals["steps"], new_tokens=totals["new_tokens"], wall_s=totals["wall_s"],
                tok_s=totals["new_tokens"] / max(totals["wall_s"], 1e-9), profiler_overhead="included in wall_s")
    (out / "profile.json").write_text(json.dumps(info, indent=2, default=str))
    return rows


def register(subparsers) -> None:
    d = RunConfig()
    p = subparsers.add_parser("profile", help="profile a short decode: Chrome trace and time per phase",
                              description="Profile a short decode under torch.profiler, in regions named like the "
                                          "step phases; writes trace.json (Chrome trace) and phase_times.csv.")
    p.add_argument("--target", default=d.target, help=f"preset, model folder, .gguf or hub id (default {d.target})")
    p.add_argument("--drafter", default="ar", help="one drafter (default ar)")
    p.add_argument("--steps", type=int, default=32, help="target forwards to profile (default 32)")
    p.add_argument("--out", type=Path, required=True, help="folder for trace.json, phase_times.csv, profile.json")
    p.add_argument("--suite", default="mini", help="prompts to decode, first turns only (default mini)")
    p.add_argument("--limit", type=int, default=4, help="at most this many prompts (default 4)")
    p.add_argument("--backend", default=d.backend)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--verify-backend", choices=("auto", "triton", "torch"), default=d.verify_backend)
    add_fast_flags(p)
    p.add_argument("--layerskip-layers", type=int, default=None)
    p.add_argument("--draft-model", default=None)
    p.add_argument("--head", default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--total-tokens", type=int, default=None)
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from harness.runner import validate

    fields = ("target", "suite", "limit", "backend", "device", "dtype", "max_len", "k", "temperature", "seed",
              "verify_backend", "layerskip_layers", "draft_model", "head", "depth", "top_k", "total_tokens")
    cfg = replace(RunConfig(), drafters=(args.drafter,), meter=False, warmup=0,
                  command=" ".join(["spec-harness"] + sys.argv[1:]), **{f: getattr(args, f) for f in fields},
                  **fast_fields(args.fast))
    validate(cfg)
    rows = profile_run(cfg, args.drafter, args.steps, args.out)
    info = json.loads((args.out / "profile.json").read_text())
    print(f"{args.drafter} on {info['target']} ({info['device']}, fast={info['fast']}): {info['steps']} steps, "
          f"{info['new_tokens']} tokens, {info['tok_s']:.1f} tok/s under the profiler")
    print(format_phase_table(rows, info["device_type"]))
    print("host ms: time the region was open on the CPU (inclusive: accept contains cache update); clock ms: "
          "the harness's own phase clock (what steps.jsonl records)")
    print(f"\n{args.out}/trace.json: open it in chrome://tracing or https://ui.perfetto.dev; "
          f"{args.out}/phase_times.csv, {args.out}/profile.json")
    return 0
