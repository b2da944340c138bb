"""Runs over several processes, GPUs and machines, launched by accelerate.

    spec-harness run --processes N ...                            runs itself again under `accelerate launch`
    accelerate launch [--config_file F.yaml] -m harness run ...   the same, with an accelerate config

Process k of N (its rank) loads its own copy of the target on cuda:LOCAL_RANK, or on the CPU (gloo
backend), and decodes the prompts whose index i in the suite has i % N == k, every drafter on each. ar's
output for a prompt is therefore in the same process, and `diverged` is computed as in a single-process
run. Each rank streams its records into its own shard folder. At the end every rank waits for the
others (accelerate's wait_for_everyone), then the main process merges the shards into the run folder,
ordered by prompt then drafter. The merged steps.jsonl and prompts.jsonl read like those of a
single-process run, and `rank` says which process decoded and timed each record.

results/<run>/shards/rank<k>/     removed once every rank has finished; kept after a failure, for --resume
    steps.jsonl, prompts.jsonl    rank k's records (fields as in harness.records)
    config.json, env.json         written by harness.runner in that process
    status.json                   {rank, host, finished, error}, written when the rank stops
env.json of the run folder is rank 0's, plus `processes` and `ranks` (the env.json of every rank).

A rank that raises an error still waits for the others, so their prompts finish and are merged. The
command then fails and names that rank. A rank that is killed takes the launch down (torchrun stops
the other ranks), but every finished prompt is already on disk. On --resume the main process pools the
finished records of the run folder and of every shard and writes them to the run folder. It then deals
them out again to N new shards (N may differ from the interrupted run's), and each rank resumes from
its shard as a single-process run resumes from its folder.

When the ranks run on several machines, --out must be a folder on a filesystem that every machine
shares, because the main process reads every shard.

Test hook: SPEC_HARNESS_FAIL_AFTER="RANK:N" makes process RANK raise an error after its N-th finished
prompt in this launch. "RANK:N:kill" makes it SIGKILL itself instead, the way the OOM killer or a lost
machine would stop it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from itertools import chain
from pathlib import Path

import torch

from harness.config import RunConfig
from harness.errors import UserError
from harness.records import check_out_dir, read_jsonl
from harness.runner import make_run_dir, run, run_dir_for, validate
from harness.suites import load_suite

SHARDS = "shards"
FAIL_ENV = "SPEC_HARNESS_FAIL_AFTER"  # test hook, see the module docstring
COMMAND_ENV = "SPEC_HARNESS_COMMAND"  # the user's command line, recorded by the launched processes
WORLD_ENVS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# The ranks finish at different times and wait for the slowest one. The default process-group timeout
# (10 to 30 minutes) is too short for long suites.
BARRIER_TIMEOUT = timedelta(hours=24)

Pair = tuple[str, str]  # (drafter, prompt_id)


# ----------------------------------------------------------------------------- launching

def launched() -> bool:
    """True inside a process started by `accelerate launch` (or torchrun, mpirun) with more than one process."""
    return any(int(os.environ.get(name, "1")) > 1 for name in WORLD_ENVS)


def should_launch(processes: int | None) -> bool:
    if processes is None:
        return False
    if processes < 1:
        raise UserError(f"--processes must be >= 1, got {processes}")
    if launched():
        world = next(int(os.environ[n]) for n in WORLD_ENVS if int(os.environ.get(n, "1")) > 1)
        if processes != world:
            raise UserError(f"--processes {processes} inside a launch of {world} processes: drop --processes")
        return False
    return processes > 1


def forwarded_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The `run` flags set in args, as a command line that `parser` reads back, without --processes."""
    argv = []
    for action in parser._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        value = getattr(args, action.dest, None)
        if not flags or action.dest in ("help", "processes") or value is None or value == action.default:
            continue
        if action.nargs == 0:  # store_true
            argv.append(flags[0])
        else:
            text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
            argv.append(f"{flags[0]}={text}")
    return argv


def launch(cfg: RunConfig, processes: int, argv: list[str]) -> int:
    """Runs `accelerate launch -m harness run ARGV` with `processes` processes on this machine."""
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if not cpu and processes > torch.cuda.device_count():
        raise UserError(f"--processes {processes} needs {processes} GPUs, {torch.cuda.device_count()} visible: "
                        "lower --processes or pass --device cpu")
    if cfg.device_map:
        raise UserError("--device-map auto spreads one process over every GPU of the machine: drop --processes")
    folder = Path(cfg.out) / (cfg.run_id or "")
    check_out_dir(folder)  # before any process starts
    if cfg.run_id and folder.is_dir() and any(folder.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"output folder {folder} exists: pass --resume to continue it or --overwrite to replace it")
    # --multi_gpu selects accelerate's torchrun launcher, which starts N processes. On the CPU each
    # process asks for gloo itself (run_rank). accelerate's --cpu flag would start a single process.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "harness", "run", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    env[COMMAND_ENV] = cfg.command
    rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc != 0:
        print(f"spec-harness: error: a process of the launch failed (exit {rc}, see above); finished prompts "
              "are kept: rerun with --resume", file=sys.stderr)
    return rc


# ----------------------------------------------------------------------------- one rank

def run_rank(cfg: RunConfig) -> Path | None:
    """Runs this process's share of a launched run. Returns the run folder on the main process, after
    the merge, and None on the others."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    cpu = cfg.device == "cpu" or not torch.cuda.is_available() or \
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")  # accelerate launch --cpu (mpirun)
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    rank, world = state.process_index, state.num_processes
    if cfg.device_map and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise UserError("--device-map auto spreads one process over every GPU of a machine: launch one "
                        "process per machine")
    cfg = replace(cfg, device="cpu" if cpu else str(state.device), command=os.environ.get(COMMAND_ENV, cfg.command))
    validate(cfg)
    order = Order(cfg)

    box = [_prepare(cfg, order, world) if state.is_main_process else None]
    broadcast_object_list(box)
    out, problem = box[0]
    if problem:
        raise UserError(problem)
    out = Path(out)
    shard = out / SHARDS / f"rank{rank}"
    shard.mkdir(parents=True, exist_ok=True)
    error = None
    try:
        # the main process already applied --overwrite to the whole run folder
        run(replace(cfg, overwrite=False), out=shard, rank=rank, world=world, after_prompt=_fault_hook(rank))
    except Exception as err:  # the other ranks finish and are merged first; re-raised below
        error = err
    status = dict(rank=rank, host=platform.node(), finished=error is None,
                  error=None if error is None else f"{type(error).__name__}: {error}")
    (shard / "status.json").write_text(json.dumps(status, indent=2), encoding="utf-8")

    state.wait_for_everyone()  # every rank has stopped decoding
    problem = _finish(out, order, world) if state.is_main_process else None
    state.wait_for_everyone()  # a failed rank exits only after the merge
    state.destroy_process_group()
    if error is not None:
        raise error
    if problem:
        raise UserError(problem)
    return out if state.is_main_process else None


def _prepare(cfg: RunConfig, order: Order, world: int) -> tuple[str | None, str | None]:
    """Main process, before decoding: creates the run folder; on --resume pools the finished records
    and deals them out to `world` shards. Returns (run folder, None) or (None, error message)."""
    try:
        out = run_dir_for(cfg)
    except UserError as err:
        return None, str(err)
    make_run_dir(cfg, out)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str), encoding="utf-8")
    if cfg.resume:
        deal(out, order, world)
    return str(out), None


def _finish(out: Path, order: Order, world: int) -> str | None:
    """Main process, after every rank stopped: merges the shards and the ranks' env.json into the run
    folder; removes the shards if every rank finished. Returns what went wrong, or None."""
    root = out / SHARDS
    statuses = {k: json.loads(p.read_text(encoding="utf-8")) for k in range(world)
                if (p := root / f"rank{k}" / "status.json").is_file()}
    merge(out, order)
    envs = [dict(rank=k, **json.loads(p.read_text(encoding="utf-8"))) for k in range(world)
            if (p := root / f"rank{k}" / "env.json").is_file()]
    if envs:
        env = {key: v for key, v in envs[0].items() if key != "rank"}
        env.update(processes=world, ranks=envs)
        (out / "env.json").write_text(json.dumps(env, indent=2), encoding="utf-8")
    unseen = [k for k in range(world) if k not in statuses]
    if unseen:
        return (f"the main process cannot see the shard folders of ranks {unseen} under {root}: put --out on a "
                "filesystem every machine shares, then rerun with --resume")
    failed = [f"rank {k} ({s['host']}): {s['error']}" for k, s in statuses.items() if not s["finished"]]
    if failed:
        return (f"{'; '.join(failed)}. The other ranks' prompts are merged into {out}: rerun with --resume "
                "to finish")
    shutil.rmtree(root)
    return None


def _fault_hook(rank: int):
    """The test hook of the module docstring: a callable for harness.runner.run(after_prompt=...)."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return None
    fields = spec.split(":")
    if len(fields) not in (2, 3) or fields[2:] not in ([], ["kill"]):
        raise UserError(f"{FAIL_ENV} must read RANK:N or RANK:N:kill, got '{spec}'")
    if int(fields[0]) != rank:
        return None
    after, finished = int(fields[1]), [0]

    def hook() -> None:
        finished[0] += 1
        if finished[0] < after:
            return
        if fields[2:] == ["kill"]:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"{FAIL_ENV}: injected failure of rank {rank} after {after} prompts")

    return hook


# ----------------------------------------------------------------------------- merging records

class Order:
    """The order of a single-process run: prompts in suite order, drafters as harness.runner.run runs
    them (ar first). Records of prompts or drafters outside this run (a changed --limit) sort last and
    go to rank 0's shard."""

    def __init__(self, cfg: RunConfig):
        prompts = load_suite(cfg.suite, limit=cfg.limit, per_category=cfg.per_category)
        if not prompts:
            raise UserError(f"suite '{cfg.suite}' selected no prompts")
        names = ["ar"] + [d for d in cfg.drafters if d != "ar"] if "ar" in cfg.drafters else list(cfg.drafters)
        self._prompts = {p.prompt_id: i for i, p in enumerate(prompts)}
        self._drafters = {n: i for i, n in enumerate(names)}

    def prompt_index(self, prompt_id: str) -> int:
        return self._prompts.get(prompt_id, 0)

    def sorted(self, pairs) -> list[Pair]:
        last_p, last_d = len(self._prompts), len(self._drafters)
        return sorted(pairs, key=lambda pair: (self._prompts.get(pair[1], last_p), str(pair[1]),
                                               self._drafters.get(pair[0], last_d), pair[0]))


def pool_records(out: Path) -> dict[Pair, tuple[dict, list[dict]]]:
    """Finished (drafter, prompt_id) -> (its prompt record, its step records), read from the run folder,
    then from each shard; the first folder that holds a pair wins. Steps of unfinished prompts are dropped."""
    pool: dict[Pair, tuple[dict, list[dict]]] = {}
    for folder in [out, *sorted((out / SHARDS).glob("rank*"))]:
        new = {(r["drafter"], r["prompt_id"]): r for r in read_jsonl(folder / "prompts.jsonl")}
        new = {pair: rec for pair, rec in new.items() if pair not in pool}
        steps: dict[Pair, list[dict]] = {pair: [] for pair in new}
        for rec in read_jsonl(folder / "steps.jsonl"):
            steps.get((rec["drafter"], rec["prompt_id"]), []).append(rec)
        pool.update({pair: (rec, steps[pair]) for pair, rec in new.items()})
    return pool


def merge(out: Path, order: Order) -> dict[Pair, tuple[dict, list[dict]]]:
    """Writes every finished record of the run folder and its shards to the run folder's prompts.jsonl
    and steps.jsonl, in single-process order. Returns the pool (see pool_records)."""
    pool = pool_records(out)
    _write_records(out, pool, order.sorted(pool))
    return pool


def deal(out: Path, order: Order, world: int) -> None:
    """--resume: merges every finished record into the run folder, then replaces the shards with `world`
    new ones; shard k holds the records of the prompts whose index i has i % world == k."""
    pool = merge(out, order)  # from here on the run folder holds every finished record
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    pairs = order.sorted(pool)
    for k in range(world):
        (out / SHARDS / f"rank{k}").mkdir(parents=True)
        _write_records(out / SHARDS / f"rank{k}", pool,
                       [pair for pair in pairs if order.prompt_index(pair[1]) % world == k])


def _write_records(folder: Path, pool: dict[Pair, tuple[dict, list[dict]]], pairs: list[Pair]) -> None:
    _write_jsonl(folder / "prompts.jsonl", (pool[pair][0] for pair in pairs))
    _write_jsonl(folder / "steps.jsonl", chain.from_iterable(pool[pair][1] for pair in pairs))


def _write_jsonl(path: Path, records) -> None:
    """Replaces path in one step, so an interrupted merge leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    os.replace(tmp, path)
