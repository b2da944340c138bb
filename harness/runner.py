"""Runs drafters over a suite on one target and writes the run folder (see harness.records)."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from harness.config import RunConfig
from harness.engine.step import decode, flush_meter
from harness.drafters import build_drafter, is_peer, is_vllm, validate_drafters
from harness.errors import UserError
from harness.engine.fast import enable_fast, enable_fast_drafter, precapture, resolve_fast
from harness.records import JsonlWriter, read_jsonl
from harness.suites import Prompt, load_suite
from harness.targets import load_target
from harness.timing import PhaseClock

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
    if path.exists() and any(path.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise UserError(f"output folder {path} exists: pass --resume to continue it or --overwrite to replace it")
    return path


def make_run_dir(cfg: RunConfig, path: Path) -> None:
    """Creates the run folder once the target and drafters loaded (a bad flag leaves nothing behind)."""
    if path.exists() and cfg.overwrite and not cfg.resume:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


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
    if dev.type == "cuda":
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return env


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return tokenizer(text)["input_ids"]


def eos_ids(target) -> set[int]:
    ids = set()
    gen = getattr(getattr(target, "hf_model", None) or getattr(target, "model", None), "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(target.tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids


def run_prompt(cfg: RunConfig, target, drafter, prompt: Prompt, eos: set[int], meter=None, max_new=None):
    """Decodes every turn of a prompt; returns (prompt record fields, step records)."""
    messages, turns, outputs, steps = [], [], [], []
    wall = 0.0
    prompt_tokens = 0
    clock = PhaseClock(target.device)
    for turn, text in enumerate(prompt.turns):
        messages.append({"role": "user", "content": text})
        ids = prompt_ids(target.tokenizer, messages)
        if len(ids) + (max_new or cfg.max_new_tokens) + cfg.k + 2 > target.max_len:
            raise UserError(f"prompt {prompt.prompt_id} needs more than --max-len {target.max_len} cache slots")
        prompt_tokens += len(ids)
        _sync(target.device)
        t0 = time.perf_counter()
        if is_peer(drafter):
            gen = drafter.generate(ids, max_new or cfg.max_new_tokens, cfg.temperature, eos)
            # a peer returns the new ids, or (harness.drafters.vllm_peer) new_ids and step records
            new_ids, turn_steps, meter_rows = getattr(gen, "new_ids", gen), list(getattr(gen, "steps", [])), []
        else:
            dec = decode(target, drafter, ids, max_new_tokens=max_new or cfg.max_new_tokens, k=cfg.k,
                         temperature=cfg.temperature, seed=cfg.seed, eos_ids=eos,
                         verify_backend=cfg.verify_backend, meter=meter, clock=clock)
            new_ids, turn_steps, meter_rows = dec.new_ids, dec.steps, []
        _sync(target.device)
        wall += time.perf_counter() - t0
        if meter is not None and not is_peer(drafter):
            meter_rows = flush_meter(meter, ids, new_ids)  # outside the timed region
        clock.resolve(turn_steps)
        for i, rec in enumerate(turn_steps):
            rec.update(turn=turn, step=i)
            if i < len(meter_rows):
                rec.update(meter_rows[i])
        steps.extend(turn_steps)
        answer = target.tokenizer.decode(new_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        turns.append(answer)
        outputs.append(new_ids)
    n_new = sum(len(o) for o in outputs)
    fields = dict(prompt_tokens=prompt_tokens, new_tokens=n_new, wall_s=wall, turns=turns, output_ids=outputs,
                  steps=len(steps) if steps else None,
                  drafted=sum(s["drafted"] for s in steps) if steps else None,
                  accepted=sum(s["accepted"] for s in steps) if steps else None)
    if hasattr(drafter, "take_fields"):  # vLLM peers: wall time measured in the worker, counters, forwards
        fields.update(drafter.take_fields())
    return fields, steps


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: RunConfig, out: Path | None = None, rank: int = 0, world: int = 1, after_prompt=None) -> Path:
    """Decodes the suite into the run folder. harness.distributed passes `out` (the rank's shard folder),
    `rank` and `world`: this process then decodes prompts[rank::world] only, and calls `after_prompt()`
    after each finished prompt record."""
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
        target = enable_fast(target)
    # -- end fast path --
    names = ["ar"] + [d for d in cfg.drafters if d != "ar"] if "ar" in cfg.drafters else list(cfg.drafters)
    drafters = {name: build_drafter(name, target, cfg) for name in names}
    if cfg.fast:  # harness.engine.fast: drafters that run a native model of their own replay graphs too
        drafters = {name: enable_fast_drafter(d) for name, d in drafters.items()}
    meter = _meter(cfg, target)
    make_run_dir(cfg, out)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    env = environment(cfg, target)
    env["peers"] = {n: d.environment() for n, d in drafters.items() if hasattr(d, "environment")}  # vLLM's venv
    (out / "env.json").write_text(json.dumps(env, indent=2))
    done, ar_out = _finished(out)
    eos = eos_ids(target)
    todo = [(p, n) for p in prompts for n in names if (n, p.prompt_id) not in done]
    # -- batched decoding, --k auto and calibrated runs (harness.engine.scheduler): own warm-up, loop and records --
    if cfg.batch_size > 1 or cfg.extra.get("k_auto") or cfg.extra.get("calibration"):
        from harness.engine.scheduler import run_batched
        # vLLM peers get the batch themselves (harness.drafters.vllm_batch), after our drafters
        vllm = {n: drafters.pop(n) for n in list(drafters) if is_vllm(n)} if cfg.batch_size > 1 else {}
        run_batched(cfg, target, drafters, prompts, done, ar_out, eos, out, meter, rank=rank,
                    after_prompt=after_prompt)
        if vllm:
            from harness.drafters.vllm_batch import run_vllm_batched
            run_vllm_batched(cfg, target, vllm, prompts, done, ar_out, eos, out, rank=rank)
        return out
    # -- end batched --
    if todo and cfg.warmup:
        for name in names:  # warm-up: not recorded
            for p in prompts[:cfg.warmup]:
                run_prompt(cfg, target, drafters[name], p, eos, meter=None, max_new=min(16, cfg.max_new_tokens))
        if cfg.fast:  # harness.engine.fast: capture every chain length now rather than inside a timed prompt
            precapture(target, drafters.values(), cfg.k)
    steps_w, prompts_w = JsonlWriter(out / "steps.jsonl"), JsonlWriter(out / "prompts.jsonl")
    totals = {n: [0, 0.0, 0, 0] for n in names}  # new tokens, wall, emitted, steps
    try:
        bar = tqdm(todo, desc="decoding" if world == 1 else f"decoding rank {rank}", unit="prompt", dynamic_ncols=True)
        for p, name in bar:
            fields, steps = run_prompt(cfg, target, drafters[name], p, eos, meter=None if is_peer(drafters[name]) else meter)
            base = dict(drafter=name, prompt_id=p.prompt_id, category=p.category, suite=p.suite, rank=rank,
                        batch_size=1)
            steps_w.write_many({**base, **s} for s in steps)
            if name == "ar":
                ar_out[p.prompt_id] = fields["output_ids"]
            diverged = None if name == "ar" or p.prompt_id not in ar_out else fields["output_ids"] != ar_out[p.prompt_id]
            prompts_w.write({**base, **fields, "diverged": diverged})
            if after_prompt is not None:
                after_prompt()
            t = totals[name]
            t[0] += fields["new_tokens"]
            t[1] += fields["wall_s"]
            t[2] += sum(s["emitted"] for s in steps)
            t[3] += len(steps)
            bar.set_postfix_str(f"{name} {t[0] / max(t[1], 1e-9):.1f} tok/s tau {t[2] / max(t[3], 1):.2f}")
    finally:
        steps_w.close()
        prompts_w.close()
    return out


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
        done.add((rec["drafter"], rec["prompt_id"]))
        if rec["drafter"] == "ar":
            ar_out[rec["prompt_id"]] = rec["output_ids"]
    steps_path = out / "steps.jsonl"
    if steps_path.exists():
        kept = [r for r in read_jsonl(steps_path) if (r["drafter"], r["prompt_id"]) in done]
        with open(steps_path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in kept)
    prompts_path = out / "prompts.jsonl"
    if prompts_path.exists():  # rewrite without a truncated last line
        recs = list(read_jsonl(prompts_path))
        with open(prompts_path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in recs)
    return done, ar_out
