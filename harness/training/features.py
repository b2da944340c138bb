"""Target features for head training, cached on disk in shards (`train-head --data sharegpt --features DIR`).

Two modes, each over its own half of the shuffled ShareGPT conversations (harness.training.sharegpt):

- `teacher`: teacher-forced on ShareGPT's own answers (EAGLE-1's recipe): the whole conversation through the
  chat template, cut to --max-len tokens, in ONE prefill; the loss is taken on the assistant tokens.
- `self`: self-distilled (EAGLE-3's and SpecForge's recipe): the conversation's first user turn through
  the chat template, answered greedily by the target (--max-new-tokens, batched); the loss is taken on
  the target's answer.

A record (one conversation) holds
    ids     [N] int64         the tokens (prompt + answer)
    answer  [N] bool          token i is an answer (assistant) token
    feats   [N-1, L, H] bf16  hidden states of the layers the head reads, for every token fed (all but the last)
    p_ids, p_vals [N-1, K]    the target's top-K next-token probabilities after each fed token
    heldout bool              every HOLDOUT_EVERY-th conversation is held out for the accuracy meter

Shards: DIR/<mode>-NNNNN.pt (records) + .json (counts so far: conversations examined, dropped for sharing an
8-token run with a built-in suite, next conversation, tokens). A shard is written whole (temporary file,
then rename), so an interrupted extraction resumes after its last complete shard. DIR/key.json names the
target (embedding fingerprint), layers and lengths; features made for another key are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from harness.errors import UserError
from harness.training.sharegpt import SuiteFilter, chat_ids, conversations

MODES = ("teacher", "self")
HOLDOUT_EVERY = 50
TOPK = 32
SHARD_TOKENS = 16384  # tokens fed per shard


def _key_check(folder: Path, key: dict) -> None:
    path = folder / "key.json"
    if path.is_file():
        have = json.loads(path.read_text())
        if have != key:
            diff = sorted(k for k in set(have) | set(key) if have.get(k) != key.get(k))
            raise UserError(f"features in {folder} were made with other settings ({', '.join(diff)}): pass another "
                            "--features folder or delete this one")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(key, indent=1) + "\n")


def _shards(folder: Path, mode: str) -> list[Path]:
    return sorted(folder.glob(f"{mode}-[0-9][0-9][0-9][0-9][0-9].json"))


def progress(folder: Path, mode: str) -> dict:
    """Counts after the last complete shard of `mode` (zeros when none)."""
    done = _shards(folder, mode)
    if not done:
        return dict(shards=0, next=0, examined=0, dropped=0, tokens=0, answer_tokens=0, conversations=0)
    return json.loads(done[-1].read_text())


def _write_shard(folder: Path, mode: str, records: list[dict], counts: dict) -> None:
    i = counts["shards"]
    stem = folder / f"{mode}-{i:05d}"
    tmp = stem.with_suffix(".pt.tmp")
    torch.save(records, tmp)
    os.replace(tmp, stem.with_suffix(".pt"))
    counts = dict(counts, shards=i + 1)
    stem.with_suffix(".json.tmp").write_text(json.dumps(counts) + "\n")
    os.replace(stem.with_suffix(".json.tmp"), stem.with_suffix(".json"))


def _topk(logits: torch.Tensor):
    p_vals, p_ids = torch.softmax(logits.float(), -1).topk(TOPK, dim=-1)
    return p_ids.cpu(), p_vals.half().cpu()


@torch.inference_mode()
def _teacher_record(target, ids: list[int], answer: list[bool], layers: tuple[int, ...]) -> dict:
    target.reset(1)
    o = target.forward(torch.tensor([ids[:-1]], device=target.device), hidden_layers=layers)
    feats = torch.stack([o.hidden[layer][0] for layer in layers], 1).to(torch.bfloat16).cpu()  # [N-1, L, H]
    p_ids, p_vals = _topk(o.logits[0])
    return dict(ids=torch.tensor(ids), answer=torch.tensor(answer), feats=feats, p_ids=p_ids, p_vals=p_vals)


def extract(target, folder: str | Path, mode: str, budget: int, layers: tuple[int, ...], key: dict, *,
            max_len: int, max_new_tokens: int, gen_batch: int, seed: int, eos: set[int]) -> dict:
    """Extracts features of `mode` until `budget` tokens are fed (resuming after the last shard); returns
    the counts (see module docstring)."""
    from harness.training.distill import self_distill

    folder = Path(folder)
    _key_check(folder, key)
    counts = progress(folder, mode)
    if counts["tokens"] >= budget:
        return counts
    convs = conversations(seed)[MODES.index(mode)::2]
    filt = SuiteFilter.for_suites(target.tokenizer)
    tok = target.tokenizer
    target.max_len = max(target.max_len, max_len + 1)
    bar = tqdm(total=budget, initial=counts["tokens"], desc=f"features ({mode})", unit="tok", dynamic_ncols=True)
    records: list[dict] = []
    shard_tokens = 0
    i = counts["next"]
    while i < len(convs) and counts["tokens"] < budget:
        if mode == "teacher":
            cid, turns = convs[i]
            i += 1
            if not filt.keep(turns):
                counts["dropped"] += 1
                counts["examined"] += 1
                continue
            counts["examined"] += 1
            got = chat_ids(tok, turns, max_len)
            if got is None:
                continue
            rec = _teacher_record(target, got[0], got[1], layers)
            rec.update(cid=cid, heldout=i % HOLDOUT_EVERY == 0)
            batch = [rec]
        else:
            prompts, meta = [], []
            while i < len(convs) and len(prompts) < gen_batch:
                cid, turns = convs[i]
                i += 1
                counts["examined"] += 1
                if not filt.keep(turns):
                    counts["dropped"] += 1
                    continue
                ids = tok.apply_chat_template(turns[:1], add_generation_prompt=True, tokenize=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
                if len(ids) + max_new_tokens <= max_len:
                    prompts.append(ids)
                    meta.append((cid, i % HOLDOUT_EVERY == 0))
            batch = []
            if prompts:
                target.max_len = max(target.max_len, max(len(p) for p in prompts) + max_new_tokens + 1)
                for (cid, held), d in zip(meta, self_distill(target, prompts, layers, max_new_tokens, len(prompts),
                                                             eos, desc=None)):
                    n = len(d["ids"])
                    batch.append(dict(ids=torch.tensor(d["ids"]), answer=torch.arange(n) >= d["plen"],
                                      feats=d["feats"].to(torch.bfloat16), p_ids=d["p_ids"],
                                      p_vals=d["p_vals"].half(), cid=cid, heldout=held))
        for rec in batch:
            fed = len(rec["ids"]) - 1
            counts["tokens"] += fed
            counts["answer_tokens"] += int(rec["answer"].sum())
            counts["conversations"] += 1
            shard_tokens += fed
            records.append(rec)
            bar.update(fed)
        counts["next"] = i
        if shard_tokens >= SHARD_TOKENS or counts["tokens"] >= budget or i >= len(convs):
            _write_shard(folder, mode, records, counts)
            counts["shards"] += 1
            records, shard_tokens = [], 0
    bar.close()
    return counts


def load(folder: str | Path, modes=MODES, tokenizer=None) -> tuple[list[dict], list[dict], dict]:
    """(train records, held-out records, counts per mode) of every complete shard in `folder`. With the
    target's tokenizer, conversations are checked again against the built-in suites as they are now (a
    suite added after extraction): those sharing an 8-token run are left out and counted
    (`dropped_at_load`)."""
    folder = Path(folder)
    train, held, info = [], [], {}
    filt = SuiteFilter.for_suites(tokenizer) if tokenizer is not None else None
    convs = dict(conversations(json.loads((folder / "key.json").read_text())["seed"])) if filt else {}
    for mode in modes:
        info[mode] = dict(progress(folder, mode), dropped_at_load=0)
        for meta in _shards(folder, mode):
            for rec in torch.load(meta.with_suffix(".pt"), weights_only=False):
                if filt is not None and not filt.keep(convs[rec["cid"]]):
                    info[mode]["dropped_at_load"] += 1
                    continue
                rec["mode"] = mode
                (held if rec["heldout"] else train).append(rec)
    return train, held, info


def feature_key(fingerprint: str, layers, max_len: int, max_new_tokens: int, seed: int,
                dtype: str = "float32") -> dict:
    """What features depend on: a folder holds features of one key only. `dtype` is the target's while
    extracting (a bf16 target's hidden states and answers differ from an fp32 one's)."""
    return dict(source="sharegpt", fingerprint=fingerprint, layers=list(layers), max_len=max_len,
                max_new_tokens=max_new_tokens, seed=seed, topk=TOPK, holdout_every=HOLDOUT_EVERY,
                dtype=dtype)
