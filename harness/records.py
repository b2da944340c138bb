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
  depth (longest draft path: = drafted for chains), accepted, emitted (= accepted + 1),
  t_draft, t_verify, t_accept, t_other (seconds; phases named as in the profiler),
  optional meter fields (lists over committed depth j = 1..emitted): h_verify, h_draft, ce_draft,
  ce_base, kl, tv, alpha_theory, surplus_ub, surplus_use (nats)
prompts.jsonl fields:
  drafter, prompt_id, category, suite, rank, prompt_tokens, new_tokens, steps (target forwards),
  drafted, accepted, wall_s, turns (list of generated texts), output_ids (list of token-id lists, one per
  turn), diverged (bool: output differs from ar's on this prompt; null for ar or when ar did not run);
  vLLM peers add forwards (decode forwards), cut_tokens (accepted tokens dropped at the end of turns) and,
  at batch 1, vllm_counters (vLLM's spec-decode counters over the prompt; harness.drafters.vllm_peer)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

STEP_FIELDS = (
    "drafter", "prompt_id", "category", "suite", "turn", "step", "rank", "batch_size",
    "drafted", "depth", "accepted", "emitted", "t_draft", "t_verify", "t_accept", "t_other",
)
PROMPT_FIELDS = (
    "drafter", "prompt_id", "category", "suite", "rank", "prompt_tokens", "new_tokens", "steps",
    "drafted", "accepted", "wall_s", "turns", "output_ids", "diverged",
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
