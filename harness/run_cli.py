"""`spec-harness run` and `spec-harness list`."""

from __future__ import annotations

import argparse
import shlex
import sys

from harness.calibrate import parse_k
from harness.config import HEAD_DTYPES, PRESETS, RunConfig
from harness.engine.fast import add_fast_flags, fast_fields
from harness.errors import UserError


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(sub) -> None:
    d = RunConfig()
    p = sub.add_parser("run", help="benchmark drafters on a suite", description="Benchmark drafters on a suite.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named defaults (flags given explicitly win)")
    p.add_argument("--target", default=None, help=f"preset, model folder, .gguf or hub id (default {d.target})")
    p.add_argument("--backend", default=None, help="native | hf | auto")
    p.add_argument("--drafters", type=_csv, default=None, help="comma-separated (default ar,ngram,layerskip)")
    p.add_argument("--suite", default=None, help="mini | humaneval | calibration (default mini)")
    p.add_argument("--prompts", default=None, help="a Spec-Bench / FastChat question.jsonl (replaces --suite)")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    p.add_argument("--per-category", type=int, default=None, help="at most this many prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--k", type=parse_k, default=None, help="draft tokens per step (1..64), or auto (best predicted K)")
    p.add_argument("--calibration", default=None,
                   help="a file from `spec-harness calibrate` (its predictions; --k auto without measuring)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-len", type=int, default=None, help="KV cache slots per sequence")
    p.add_argument("--out", default=None, help="parent folder of the run folder (default results/)")
    p.add_argument("--run-id", default=None, help="name of the run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run, skipping finished prompts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--verify-backend", choices=("auto", "triton", "torch"), default=None)
    p.add_argument("--meter", choices=("on", "off"), default=None, help="information-surplus meter (default on)")
    p.add_argument("--meter-base", default=None, help="n-gram base from `spec-harness fit-base` (default: shipped)")
    p.add_argument("--layerskip-layers", type=int, default=None)
    p.add_argument("--skip-layers", default=None,
                   help="selfspec: auto (search on the calibration prompts), a search.json, or e.g. 8,9,10")
    p.add_argument("--suffix-max-nodes", type=int, default=None, help="suffix: draft nodes per step (default 10)")
    p.add_argument("--suffix-alpha", type=float, default=None, help="suffix: nodes per matched token (default 4)")
    p.add_argument("--suffix-corpus", default=None,
                   help="suffix: .txt/.jsonl text added to the global trie, or a shipped corpus (smollm2)")
    p.add_argument("--suffix-verify-cost", default=None,
                   help="suffix: A,B = a verify of 1+n tokens costs 1+A+B*n one-token forwards (default 0.05,0.055; "
                        "0,0 on a GPU: whole trees)")
    p.add_argument("--draft-model", default=None)
    p.add_argument("--head", default=None, help="EAGLE head folder")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--total-tokens", type=int, default=None)
    p.add_argument("--stop-below", type=float, default=None,
                   help="eagle/eagle3 chains: a row proposes its next draft only while the head's probability of "
                        "its chain so far times its next q's largest entry is >= P (0, the default: always --k)")
    p.add_argument("--head-dtype", choices=HEAD_DTYPES, default=None,
                   help="eagle/eagle3 on a CPU: the dtype the head drafts in (default: the target's; bfloat16 "
                        "halves a draft step's products where the CPU has bf16 ones; verification stays the target's)")
    p.add_argument("--vllm-head", default=None,
                   help="vllm-eagle3: a head folder in vLLM's EAGLE-3 layout (default: the shipped one)")
    p.add_argument("--vllm-tensor-parallel-size", type=int, default=None,
                   help="vLLM peers on GPUs: tensor_parallel_size N (default 1)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    add_fast_flags(p)
    # -- multi-process runs (harness.distributed) --
    p.add_argument("--processes", type=int, default=None,
                   help="split the prompts over N processes (one per GPU) under `accelerate launch`")
    p.add_argument("--device-map", choices=("auto",), default=None,
                   help="spread a target too large for one GPU over the visible GPUs (hf backend)")
    p.set_defaults(func=cmd_run, run_parser=p)
    # -- end multi-process runs --

    ls = sub.add_parser("list", help="list targets, drafters and suites")
    ls.set_defaults(func=cmd_list)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = dict(PRESETS[args.preset]) if args.preset else {}
    for key in ("target", "backend", "drafters", "suite", "limit", "per_category", "max_new_tokens", "temperature",
                "seed", "device", "dtype", "max_len", "out", "run_id", "verify_backend", "meter_base", "layerskip_layers",
                "skip_layers", "suffix_max_nodes", "suffix_alpha", "suffix_corpus", "suffix_verify_cost", "draft_model",
                "head", "depth", "top_k", "total_tokens", "stop_below", "head_dtype", "warmup", "batch_size", "device_map"):
        v = getattr(args, key)
        if v is not None:
            values[key] = v
    if args.k is not None:
        k, auto = args.k
        if auto:
            values.setdefault("extra", {})["k_auto"] = True
        else:
            values["k"] = k
    if args.calibration:
        values.setdefault("extra", {})["calibration"] = args.calibration
    if args.prompts:
        values["suite"] = args.prompts
    if args.vllm_head:
        values.setdefault("extra", {})["vllm_head"] = args.vllm_head
    if args.vllm_tensor_parallel_size is not None:
        if args.vllm_tensor_parallel_size < 1:
            raise UserError(f"--vllm-tensor-parallel-size must be >= 1, got {args.vllm_tensor_parallel_size}")
        values.setdefault("extra", {})["vllm_tensor_parallel_size"] = args.vllm_tensor_parallel_size
    if args.meter is not None:
        values["meter"] = args.meter == "on"
    values.update(fast_fields(args.fast))
    values.update(resume=args.resume, overwrite=args.overwrite,
                  command=" ".join(shlex.quote(a) for a in ["spec-harness"] + sys.argv[1:]))
    return RunConfig(**values)


def cmd_run(args: argparse.Namespace) -> int:
    from harness import distributed
    from harness.runner import run
    from harness.reports.summary import failed_prompts, format_table, write_summary

    cfg = config_from_args(args)
    # -- multi-process runs (harness.distributed) --
    if distributed.should_launch(args.processes):
        return distributed.launch(cfg, args.processes, distributed.forwarded_argv(args.run_parser, args))
    if distributed.launched():
        out = distributed.run_rank(cfg)
        if out is None:  # not the main process: the main one merges and summarises
            return 0
    else:
        out = run(cfg)
    # -- end multi-process runs --
    failed = failed_prompts(out)
    try:
        df = write_summary(out)
        print(format_table(df))
    except UserError:
        if not failed:
            raise
    print(f"\nresults: {out}/ (summary.md, summary.csv, steps.jsonl, prompts.jsonl, env.json)")
    if failed:
        print(f"spec-harness: error: {len(failed)} prompt(s) failed (listed in summary.md); rerun with --resume "
              "to retry them", file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from harness.drafters import DRAFTERS
    from harness.suites import list_suites
    from harness.targets.loading import PRESETS as TARGETS

    print("targets:")
    for name, p in TARGETS.items():
        print(f"  {name:18s} {p.description} (package {p.package})")
    print("  (or a transformers model folder, a .gguf file, a hub id)")
    print("drafters:")
    for name, text in DRAFTERS.items():
        print(f"  {name:18s} {text}")
    print("suites:")
    for name, text in list_suites().items():
        print(f"  {name:18s} {text}")
    print("  (or --prompts FILE: a Spec-Bench / FastChat question.jsonl)")
    return 0


__all__ = ["register", "UserError"]
