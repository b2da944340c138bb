"""The losslessness gate that works in bf16: where a drafter's output first left `ar`'s, and how close
the target's choice was there.

For each prompt on which a drafter diverged from `ar` (at temperature 0), `divergence.jsonl` gets one
line: the first differing turn and position, both tokens, and the target's top-1 minus top-2 logit
margin at that position in `ar`'s context (one prefill, after the run, outside every timed region).
A flip at a near-tie is numerics (bf16: a K+1-token verify is not bitwise equal to K+1 one-token
steps); a flip at a wide margin is a bug. The summary's `diverged_wide` is the share of prompts whose
first divergence had a margin above WIDE_MARGIN; it must be 0 everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.records import JsonlWriter, read_jsonl
from harness.targets.chat import prompt_ids

DIVERGENCE = "divergence.jsonl"
# Logit units. bf16 logits of a verify forward differ from one-token steps by far less than this on the
# models we run; a correct verifier can only flip a token whose top-2 logits are that close.
WIDE_MARGIN = 1.0


def first_difference(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    """(turn, position) of the first token where outputs a and b (lists of turns) differ, or None."""
    for turn, (x, y) in enumerate(zip(a, b)):
        for pos, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return turn, pos
        if len(x) != len(y):
            return turn, min(len(x), len(y))
    if len(a) != len(b):
        return min(len(a), len(b)), 0
    return None


@torch.inference_mode()
def margin_at(target, messages: list[dict], prefix: list[int]) -> tuple[float, int]:
    """(top-1 minus top-2 logit, top-1 token) of the target after the chat prompt and prefix."""
    ids = prompt_ids(target.tokenizer, messages) + list(prefix)
    target.reset(1)
    logits = target.prefill(torch.tensor([ids], dtype=torch.long, device=target.device)).logits[0, -1].float()
    top = logits.topk(2)
    return float(top.values[0] - top.values[1]), int(top.indices[0])


def divergences(out: Path, target, cfg, prompts) -> int:
    """Writes the missing divergence lines of a run folder (temperature 0 only); returns how many."""
    if cfg.temperature != 0:
        return 0
    out = Path(out)
    recs = [r for r in read_jsonl(out / "prompts.jsonl") if not r.get("failed")]
    ar = {r["prompt_id"]: r for r in recs if r["drafter"] == "ar"}
    have = {(r["drafter"], r["prompt_id"]) for r in read_jsonl(out / DIVERGENCE)}
    by_id = {p.prompt_id: p for p in prompts}
    todo = [r for r in recs if r.get("diverged") and (r["drafter"], r["prompt_id"]) not in have
            and r["prompt_id"] in ar and r["prompt_id"] in by_id]
    if not todo:
        return 0
    writer = JsonlWriter(out / DIVERGENCE)
    try:
        for r in todo:
            base = ar[r["prompt_id"]]
            where = first_difference(base["output_ids"], r["output_ids"])
            if where is None:
                continue
            turn, pos = where
            messages = []
            for t in range(turn + 1):
                messages.append({"role": "user", "content": by_id[r["prompt_id"]].turns[t]})
                if t < turn:
                    messages.append({"role": "assistant", "content": base["turns"][t]})
            ar_turn = base["output_ids"][turn] if turn < len(base["output_ids"]) else []
            margin, top = margin_at(target, messages, ar_turn[:pos])
            mine = r["output_ids"][turn] if turn < len(r["output_ids"]) else []
            writer.write(dict(drafter=r["drafter"], prompt_id=r["prompt_id"], turn=turn, position=pos,
                              ar_token=ar_turn[pos] if pos < len(ar_turn) else None,
                              drafter_token=mine[pos] if pos < len(mine) else None, target_top1=top,
                              margin=margin, wide=bool(margin > WIDE_MARGIN)))
    finally:
        writer.close()
    return len(todo)
