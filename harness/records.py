"""The run folder: raw records first; every table and plot is derived from them.

results/<run-id>/
  config.json     the run's configuration (RunConfig as a dict) and the exact command
  env.json        device name, driver, versions of python/torch/transformers/triton, dtype, seed, git commit, command
  steps.jsonl     one line per (drafter, prompt, turn, step): a target forward and what it emitted
  prompts.jsonl   one line per (drafter, prompt) once that prompt is finished (the resume marker)
  summary.csv     one row per drafter x category plus category "all" (see harness.reports.summary)
  summary.md      the table a person reads

steps.jsonl fields:
  drafter, prompt_id, category, suite, turn, step, rank (process rank), batch_size,
  drafted (draft tokens proposed: chain length, or tree nodes excluding the root),
  depth (longest draft path: = drafted for chains), accepted, emitted (= accepted + 1, except in a
  step cut at EOS or --max-new-tokens: cut = true, emitted = the tokens kept, accepted = min(accepted,
  emitted) and, for chains, drafted and depth = min(., emitted): every count is of what was emitted),
  t_draft, t_verify, t_accept, t_other (seconds; phases named as in the profiler),
  optional meter fields (lists over committed depth j = 1..emitted): h_verify, h_draft, ce_draft,
  ce_base, kl, tv, alpha_theory, surplus_ub, surplus_use (nats)
prompts.jsonl fields:
  drafter, prompt_id, category, suite, rank, prompt_tokens, new_tokens, steps (target forwards),
  drafted, accepted, wall_s, turns (list of generated texts), output_ids (list of token-id lists, one per
  turn), diverged (bool: output differs from ar's on this prompt; null for ar or when ar did not run),
  failed (only on a prompt that failed: the one-line reason; --resume retries it);
  vLLM peers add forwards (decode forwards), cut_tokens (accepted tokens dropped at the end of turns) and,
  at batch 1, vllm_counters (vLLM's spec-decode counters over the prompt; harness.drafters.vllm_peer)
divergence.jsonl (harness.engine.divergence): per diverged (drafter, prompt) at temperature 0, the first
  differing turn and position, both tokens and the target's top-1 minus top-2 logit margin there
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from harness.errors import UserError

BATCH_RUNS = "batch_runs.jsonl"  # one line per drafter and attempt of a batched run (harness.runner)
BATCH_FIELDS = (
    "drafter", "suite", "batch_size", "k", "k_auto", "prompts", "new_tokens", "wall_s", "tok_s_total",
    "predicted_tau", "predicted_tok_s", "predicted_speedup",
)
STEP_FIELDS = (
    "drafter", "prompt_id", "category", "suite", "turn", "step", "rank", "batch_size",
    "drafted", "depth", "accepted", "emitted", "cut", "t_draft", "t_verify", "t_accept", "t_other",
)
PROMPT_FIELDS = (
    "drafter", "prompt_id", "category", "suite", "rank", "prompt_tokens", "new_tokens", "steps",
    "drafted", "accepted", "wall_s", "turns", "output_ids", "diverged", "failed",
)
METER_FIELDS = (
    "h_verify", "h_draft", "ce_draft", "ce_base", "kl", "tv", "alpha_theory", "surplus_ub", "surplus_use",
)


class JsonlWriter:
    """Appends records to a JSONL file and flushes each line, so an interrupted run keeps its work."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        for rec in records:
            self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yields records; a truncated last line (from an interrupted run) is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


# ----------------------------------------------------------------------------- a run's identity

def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _text(value, *keys: str) -> str:
    """A record field as text: a dict gives its first present key (e.g. a device's name)."""
    if isinstance(value, dict):
        for k in keys:
            if value.get(k):
                return str(value[k])
        return json.dumps(value, sort_keys=True)
    return "unknown" if value in (None, "") else str(value)


def run_info(run_dir: Path) -> dict[str, str]:
    """device (env.json), target (config.json), commit and command of a run folder."""
    env, config = _read_json(run_dir / "env.json"), _read_json(run_dir / "config.json")
    return {
        "name": run_dir.resolve().name,
        "device": _text(env.get("device"), "name", "device"),
        "target": _text(config.get("target"), "name", "model", "id", "path"),
        "commit": _text(env.get("git_commit", env.get("commit"))),
        "command": _text(config.get("command", env.get("command"))),
    }


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """Raises a one-line UserError when folder `path` could not be created or written: a file where it
    or one of its parents should be, or no write permission in its nearest existing folder. Called
    before a model loads; leaves nothing behind (the write test creates and removes an empty folder)."""
    path = Path(path).expanduser()
    existing = path
    try:
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if existing == path and not path.is_dir():
            raise UserError(f"{flag} {path} is a file, not a folder: remove it or choose another {flag}")
        if not existing.is_dir():
            raise UserError(f"{flag} {path} cannot be created: {existing} is a file, not a folder; "
                            f"choose another {flag}")
        os.rmdir(tempfile.mkdtemp(prefix=".spec-harness-write-test-", dir=existing))
    except OSError as err:
        where = "is not writable" if existing == path else f"cannot be created in {existing}"
        raise UserError(f"{flag} {path} {where} ({err.strerror or err}): choose a folder you can write to") from None


def check_out_file(path: Path, flag: str = "--out") -> None:
    """check_out_dir for the folder of output file `path`, and `path` itself is no folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give the path of a file")
    check_out_dir(path.parent, flag)
