"""Runs drafters over a suite on one target and writes the run folder (see harness.records)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from harness.config import RunConfig
from harness.drafters import base_name, build_drafter, drafter_config, is_peer, is_vllm, validate_drafters
from harness.engine.divergence import divergences
from harness.engine.fast import enable_fast, enable_fast_drafter, precapture, resolve_fast
from harness.engine.scheduler import Scheduler
from harness.errors import UserError
from harness.provenance import git_commit
from harness.records import BATCH_RUNS, JsonlWriter, check_out_dir, read_jsonl
from harness.suites import Prompt, load_suite
from harness.targets import load_target
from harness.targets.chat import eos_ids, prompt_ids

BASES = Path(__file__).resolve().parent / "heads"  # shipped n-gram base predictors: <target>.ngram.safetensors


def validate(cfg: RunConfig) -> None:
    if not 1 <= cfg.k <= 64:
        raise UserError(f"--k must be between 1 and 64, got {cfg.k}")
    if cfg.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {cfg.temperature}")
    if cfg.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be > 0, got {cfg.max_new_tokens}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    validate_drafters(cfg.drafters)


def run_dir_for(cfg: RunConfig) -> Path:
    """The run folder; refuses an existing one unless --resume or --overwrite. Creates nothing."""
    run_id = cfg.run_id or f"{Path(cfg.target).stem}-{Path(cfg.suite).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(cfg.out) / run_id
    check_out_dir(path)  # a file in the way, or no write permission: one line before anything loads
    if path.exists() and any(path.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise UserError(f"output folder {path} exists: pass --resume to continue it or --overwrite to replace it")
    return path


def make_run_dir(cfg: RunConfig, path: Path) -> None:
    """Creates the run folder once the target and drafters loaded (a bad flag leaves nothing behind)."""
    if path.exists() and cfg.overwrite and not cfg.resume:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def environment(cfg: RunConfig, target) -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = target.device
    env = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
               device_type=dev.type, cuda=torch.version.cuda, driver=None,
               python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
               triton=triton_version, dtype=str(target.dtype).replace("torch.", ""), seed=cfg.seed,
               target=target.name, backend=target.backend, git_commit=git_commit(), command=cfg.command,
               threads=torch.get_num_threads(), host=platform.node(), time=datetime.now().isoformat(timespec="seconds"))
    model = getattr(target, "hf_model", None) or getattr(target, "model", None)
    placement = getattr(model, "hf_device_map", None)  # set by accelerate when it spread the model over devices
    env["device_map"] = placement or ({"": str(dev)} if cfg.device_map else None)  # --device-map auto: module -> device
    env["fast"] = cfg.fast  # harness.engine.fast: steps replayed as CUDA graphs
    env["fast_mode"] = cfg.fast_mode if cfg.fast else None  # graph | compile
    env["attention"] = getattr(getattr(target, "model", None), "attention", None)  # harness.targets.attention
    if dev.type == "cuda":
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return env


def run_prompt(cfg: RunConfig, target, drafter, prompt: Prompt, eos: set[int], meter=None, max_new=None,
               name: str | None = None):
    """Decodes every turn of one prompt at batch 1; returns (prompt record fields, step records). A
    failure of our drafters comes back as fields["failed"] (the reason) with the turns finished so far."""
    max_new = max_new or cfg.max_new_tokens
    if is_peer(drafter):
        return _run_peer(cfg, target, drafter, prompt, eos, max_new)
    got = {}
    sched = Scheduler(target, drafter, name=name or drafter.name, batch_size=1, max_new_tokens=max_new, k=cfg.k,
                      temperature=cfg.temperature, seed=cfg.seed, eos_ids=eos, verify_backend=cfg.verify_backend,
                      new_meter=(lambda: meter) if meter is not None else None,
                      on_finish=lambda _p, f, st: got.update(fields=f, steps=st),
                      on_fail=lambda _p, reason, f: got.update(fields={**f, "failed": reason}, steps=[]))
    sched.run([prompt])
    return got["fields"], got["steps"]


def _run_peer(cfg, target, drafter, prompt: Prompt, eos: set[int], max_new: int):
    """A transformers peer: its own generate, timed around the call only."""
    messages, turns, outputs, steps = [], [], [], []
    wall, prompt_tokens = 0.0, 0
    for turn, text in enumerate(prompt.turns):
        messages.append({"role": "user", "content": text})
        ids = prompt_ids(target.tokenizer, messages)
        if len(ids) + max_new + cfg.k + 2 > target.max_len:
            raise UserError(f"prompt {prompt.prompt_id} needs more than --max-len {target.max_len} cache slots")
        prompt_tokens += len(ids)
        _sync(target.device)
        t0 = time.perf_counter()
        gen = drafter.generate(ids, max_new, cfg.temperature, eos)
        _sync(target.device)
        wall += time.perf_counter() - t0
        # a peer returns the new ids, or (harness.drafters.vllm_peer) new_ids and step records
        new_ids = getattr(gen, "new_ids", gen)
        for i, rec in enumerate(getattr(gen, "steps", [])):
            steps.append({**rec, "turn": turn, "step": i})
        answer = target.tokenizer.decode(new_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        turns.append(answer)
        outputs.append(new_ids)
    fields = dict(prompt_tokens=prompt_tokens, new_tokens=sum(len(o) for o in outputs), wall_s=wall, turns=turns,
                  output_ids=outputs, steps=len(steps) if steps else None,
                  drafted=sum(s["drafted"] for s in steps) if steps else None,
                  accepted=sum(s["accepted"] for s in steps) if steps else None)
    if hasattr(drafter, "take_fields"):  # vLLM peers: wall time measured in the worker, counters, forwards
        fields.update(drafter.take_fields())
    return fields, steps


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Records:
    """The run folder's record files (harness.records): steps, prompts, batched runs, divergences."""

    def __init__(self, out: Path, ar_out: dict, rank: int, after_prompt):
        self.out = out
        self.steps_w, self.prompts_w = JsonlWriter(out / "steps.jsonl"), JsonlWriter(out / "prompts.jsonl")
        self.runs_w = JsonlWriter(out / BATCH_RUNS)
        self.ar_out, self.rank, self.after_prompt = ar_out, rank, after_prompt
        self.failed = 0

    def prompt(self, name: str, batch_size: int, p: Prompt, fields: dict, steps: list[dict]) -> None:
        base = dict(drafter=name, prompt_id=p.prompt_id, category=p.category, suite=p.suite, rank=self.rank,
                    batch_size=batch_size)
        if fields.get("failed"):
            self.failed += 1
            tqdm.write(f"spec-harness: {name} failed on prompt {p.prompt_id}: {fields['failed']}")
            self.prompts_w.write({**base, **fields, "diverged": None})
        else:
            self.steps_w.write_many({**base, **s} for s in steps)
            if name == "ar":
                self.ar_out[p.prompt_id] = fields["output_ids"]
            diverged = None if name == "ar" or p.prompt_id not in self.ar_out else fields["output_ids"] != self.ar_out[p.prompt_id]
            self.prompts_w.write({**base, **fields, "diverged": diverged})
        if self.after_prompt is not None:
            self.after_prompt()

    def close(self) -> None:
        for w in (self.steps_w, self.prompts_w, self.runs_w):
            w.close()


def run(cfg: RunConfig, out: Path | None = None, rank: int = 0, world: int = 1, after_prompt=None) -> Path:
    """Decodes the suite into the run folder. harness.distributed passes `out` (the rank's shard folder),
    `rank` and `world`: this process then decodes prompts[rank::world] only, and calls `after_prompt()`
    after each finished prompt record.

    Every drafter of ours runs through the scheduler (harness.engine.scheduler). At --batch-size 1 the
    prompts are interleaved (prompt 1 for every drafter, then prompt 2, ...), so an interrupted run has
    every drafter on its first prompts; at larger batch sizes, with --k auto or a calibration, each
    drafter decodes all its prompts in one batched run (batch_runs.jsonl records it). A prompt that fails
    is recorded with its reason and the run goes on; `--resume` retries it."""
    validate(cfg)
    prompts = load_suite(cfg.suite, limit=cfg.limit, per_category=cfg.per_category)
    if not prompts:
        raise UserError(f"suite '{cfg.suite}' selected no prompts")
    out = run_dir_for(cfg) if out is None else out
    prompts = prompts[rank::world]  # round-robin by prompt index (harness.distributed)
    target = load_target(cfg.target, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype, max_len=cfg.max_len,
                         device_map=cfg.device_map)
    # -- fast path (harness.engine.fast): CUDA graphs, on by default for a native target on CUDA --
    cfg.fast = resolve_fast(cfg.fast, target)
    if cfg.fast:
        target = enable_fast(target, mode=cfg.fast_mode)
    names = ["ar"] + [d for d in cfg.drafters if d != "ar"] if "ar" in cfg.drafters else list(cfg.drafters)
    if any(base_name(n) == "selfspec" for n in names) and (cfg.skip_layers or "auto").strip() == "auto":
        from harness.selfspec_search import format_table as search_table, search
        cfg.extra["selfspec_search"] = search(target)  # the skip set, chosen on the calibration prompts
        print(search_table(cfg.extra["selfspec_search"]))
    drafters = {name: build_drafter(name, target, cfg) for name in names}
    if cfg.fast:  # drafters that run a native model of their own replay graphs too
        drafters = {name: enable_fast_drafter(d, cfg.fast_mode) for name, d in drafters.items()}
    B = cfg.batch_size
    if B > 1:
        for name, drafter in drafters.items():
            if is_peer(drafter) and not is_vllm(base_name(name)):
                raise UserError(f"{name} (a peer) decodes one sequence at a time: drop it or use --batch-size 1")
    meter = _meter(cfg, target)
    make_run_dir(cfg, out)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    env = environment(cfg, target)
    env["peers"] = {n: d.environment() for n, d in drafters.items() if hasattr(d, "environment")}  # vLLM's venv
    (out / "env.json").write_text(json.dumps(env, indent=2))
    done, ar_out = _finished(out)
    eos = eos_ids(target)
    rec = Records(out, ar_out, rank, after_prompt)
    try:
        if B > 1 or cfg.extra.get("k_auto") or cfg.extra.get("calibration"):
            # vLLM peers get the batch themselves (harness.drafters.vllm_batch), after our drafters
            vllm = {n: drafters.pop(n) for n in list(drafters) if is_vllm(base_name(n))} if B > 1 else {}
            _run_batched(cfg, target, drafters, prompts, done, eos, rec, meter)
            if vllm:
                from harness.drafters.vllm_batch import run_vllm_batched
                rec.close()
                run_vllm_batched(cfg, target, vllm, prompts, done, rec.ar_out, eos, out, rank=rank)
                rec = Records(out, rec.ar_out, rank, after_prompt)
        else:
            _run_interleaved(cfg, target, drafters, prompts, done, eos, rec, meter, rank, world)
    except KeyboardInterrupt:  # the finished prompts are kept: so are their divergence lines (a second
        rec.close()            # interrupt stops those; --resume writes the missing ones)
        with contextlib.suppress(KeyboardInterrupt):
            divergences(out, target, cfg, prompts)
        raise
    finally:
        rec.close()
    divergences(out, target, cfg, prompts)  # outside every timed region
    return out


def _run_interleaved(cfg, target, drafters, prompts, done, eos, rec, meter, rank, world) -> None:
    todo = [(p, n) for p in prompts for n in drafters if (n, p.prompt_id) not in done]
    if todo and cfg.warmup:
        for name, drafter in drafters.items():  # warm-up: not recorded
            for p in prompts[:cfg.warmup]:
                run_prompt(drafter_config(cfg, name), target, drafter, p, eos, max_new=min(16, cfg.max_new_tokens),
                           name=name)
        if cfg.fast:  # capture every chain length now rather than inside a timed prompt
            precapture(target, drafters.values(), max(drafter_config(cfg, n).k for n in drafters))
    totals = {n: [0, 0.0, 0, 0] for n in drafters}  # new tokens, wall, emitted, steps
    bar = tqdm(todo, desc="decoding" if world == 1 else f"decoding rank {rank}", unit="prompt", dynamic_ncols=True)
    for p, name in bar:
        drafter = drafters[name]
        fields, steps = run_prompt(drafter_config(cfg, name), target, drafter, p, eos,
                                   meter=None if is_peer(drafter) else meter,
                                   name=name)
        rec.prompt(name, 1, p, fields, steps)
        t = totals[name]
        t[0] += fields["new_tokens"]
        t[1] += fields["wall_s"]
        t[2] += sum(s["emitted"] for s in steps)
        t[3] += len(steps)
        bar.set_postfix_str(f"{name} {t[0] / max(t[1], 1e-9):.1f} tok/s tau {t[2] / max(t[3], 1):.2f}")


def _run_batched(cfg, target, drafters, prompts, done, eos, rec, meter) -> None:
    """Per drafter (ar first): resolve K and the prediction (harness.calibrate), warm up at the run's batch
    shape, decode the unfinished prompts in one batched run, record it in batch_runs.jsonl."""
    from harness.calibrate import plan_for_run

    B = cfg.batch_size
    for name, drafter in drafters.items():
        todo = [p for p in prompts if (name, p.prompt_id) not in done]
        if not todo:
            continue
        k, prediction = plan_for_run(drafter_config(cfg, name), target, drafter, name, rec.out)
        dcfg = dataclasses.replace(drafter_config(cfg, name), k=k)
        bar = tqdm(total=len(todo), desc=f"{name} B={B} K={k}", unit="prompt", dynamic_ncols=True)
        new_tokens = [0]

        def finish(p, fields, steps, name=name, bar=bar, new_tokens=new_tokens):
            rec.prompt(name, B, p, fields, steps)
            new_tokens[0] += fields["new_tokens"]
            bar.update(1)

        if is_peer(drafter):  # batch 1 only (refused above otherwise)
            t0 = time.perf_counter()
            for p in todo:
                fields, steps = run_prompt(dcfg, target, drafter, p, eos, name=name)
                finish(p, fields, steps)
            wall = time.perf_counter() - t0
        else:
            kw = dict(name=name, batch_size=B, k=k, temperature=cfg.temperature, seed=cfg.seed, eos_ids=eos,
                      verify_backend=cfg.verify_backend)
            if cfg.warmup:  # one batch of short answers at the run's batch shape, not recorded
                Scheduler(target, drafter, max_new_tokens=min(16, cfg.max_new_tokens), **kw).run(prompts[:B])
            wall = Scheduler(target, drafter, max_new_tokens=cfg.max_new_tokens, new_meter=_meter_factory(meter, k),
                             on_finish=finish, on_fail=lambda p, reason, f, finish=finish: finish(p, {**f, "failed": reason}, []),
                             **kw).run(todo)
        bar.close()
        rec.runs_w.write(dict(drafter=name, suite=cfg.suite, batch_size=B, k=0 if name == "ar" else k,
                              k_auto=bool(cfg.extra.get("k_auto")) and name != "ar", prompts=len(todo),
                              new_tokens=new_tokens[0], wall_s=wall,
                              tok_s_total=new_tokens[0] / wall if wall else math.nan, **(prediction or {})))


def _meter_factory(meter, k: int):
    """Fresh batch-1 meters like the run's (each row keeps its own), deep enough for K."""
    if meter is None:
        return None
    kind = type(meter)
    return lambda: kind(meter.device, meter.max_steps, max(k, meter.max_depth), enabled=meter.enabled, base=meter.base)


def _meter(cfg: RunConfig, target):
    """The information-surplus meter. Its n-gram base: --meter-base, else the one shipped for the target
    (fitted on target-generated text disjoint from every suite), else none (ce_base is then null)."""
    if not cfg.meter:
        return None
    from harness.meter.core import build_meter

    shipped = BASES / f"{target.name}.ngram.safetensors"
    if cfg.meter_base is None and shipped.is_file():
        cfg.meter_base = str(shipped)
    return build_meter(cfg, target)


def _finished(out: Path):
    """On --resume: the (drafter, prompt) pairs already finished, and ar's outputs; drops the step
    records of unfinished prompts (they will be decoded again)."""
    done, ar_out = set(), {}
    for rec in read_jsonl(out / "prompts.jsonl"):
        if rec.get("failed"):
            continue  # retried
        done.add((rec["drafter"], rec["prompt_id"]))
        if rec["drafter"] == "ar":
            ar_out[rec["prompt_id"]] = rec["output_ids"]
    steps_path = out / "steps.jsonl"
    if steps_path.exists():
        kept = [r for r in read_jsonl(steps_path) if (r["drafter"], r["prompt_id"]) in done]
        with open(steps_path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in kept)
    prompts_path = out / "prompts.jsonl"
    if prompts_path.exists():  # rewrite without a truncated last line and without failed prompts
        recs = [r for r in read_jsonl(prompts_path) if not r.get("failed")]
        with open(prompts_path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in recs)
    return done, ar_out
