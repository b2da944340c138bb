"""The meter's base predictor q_base: an interpolated Kneser-Ney n-gram model over token ids.

It is fitted on text the target generated (held out from the run's prompts) and gives ce_base, the
cross-entropy of a committed token under a model that sees only the last few tokens. Our choice of
smoothing (the paper, arXiv 2507.19247 section 4.1, names no estimator):

    P_m(w | h) = max(c_m(h w) - D_m, 0) / c_m(h) + D_m * T_m(h) / c_m(h) * P_{m-1}(w | h[1:])
    P_m(w | h) = P_{m-1}(w | h[1:])                    when c_m(h) = 0 (context never seen)
    P_0(w)     = 1 / V                                 (uniform floor over the whole vocabulary)

c_m are raw counts at the model's own order (the "top" level) and continuation counts
N1+(. h w) (number of distinct tokens seen before h w) at every lower level; T_m(h) = number of distinct
w with c_m(h w) > 0; D_m = n1 / (n1 + 2 n2) from that level's count-of-counts, clipped to [0.05, 0.95].
Every distribution sums to 1 over the V tokens and gives each token a probability > 0.

Context length per query token can be capped (`context_len`): a token with cap m is scored by the
Kneser-Ney model of order m + 1 (raw counts at level m + 1). The meter uses this to condition only on
tokens committed earlier in the same step. Without a cap, a token sees up to order - 1 previous tokens,
and the start of a sequence is padded with a pseudo-token (id = vocab_size) exactly as in fitting.

Storage: n-grams of order m are keyed by id(prefix) * (V + 1) + w, where id(prefix) is the prefix's index
in the sorted table of order m - 1; lookups are vectorised with np.searchsorted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from harness.errors import UserError

_D_MIN, _D_MAX = 0.05, 0.95


def _discount(counts: np.ndarray) -> float:
    n1 = int(np.count_nonzero(counts == 1))
    n2 = int(np.count_nonzero(counts == 2))
    d = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5
    return float(min(max(d, _D_MIN), _D_MAX))


class _Level:
    """The n-grams of one order m: sorted keys, raw and continuation counts, per-context totals."""

    def __init__(self, keys: np.ndarray, raw: np.ndarray, cont: np.ndarray, num_ctx: int, radix: int):
        self.keys = keys          # [G] int64, sorted: id(prefix) * radix + w
        self.raw = raw            # [G] int64, occurrences ending at a real token
        self.cont = cont          # [G] int64, distinct left extensions (lower levels only; else 0)
        ctx = keys // radix       # [G] index of the prefix in the level below (0 for order 1)
        self.raw_tot = np.bincount(ctx, weights=raw, minlength=num_ctx)          # [num_ctx]
        self.raw_types = np.bincount(ctx, weights=raw > 0, minlength=num_ctx)
        self.cont_tot = np.bincount(ctx, weights=cont, minlength=num_ctx)
        self.cont_types = np.bincount(ctx, weights=cont > 0, minlength=num_ctx)
        self.d_raw = _discount(raw[raw > 0])
        self.d_cont = _discount(cont[cont > 0])

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Index of each key in the table, -1 where absent."""
        idx = np.searchsorted(self.keys, keys)
        idx = np.minimum(idx, len(self.keys) - 1)
        return np.where(self.keys[idx] == keys, idx, -1)


class NgramBase:
    """Interpolated Kneser-Ney over token ids (see the module docstring)."""

    def __init__(self, order: int, vocab_size: int, levels: list[_Level], meta: dict | None = None):
        self.order = order
        self.vocab_size = vocab_size
        self.pad = vocab_size          # pseudo-token before the start of a sequence
        self.radix = vocab_size + 1
        self.levels = levels           # levels[m - 1] holds order m
        self.meta = dict(meta or {})

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, sequences: list[list[int]], order: int = 3, vocab_size: int | None = None) -> "NgramBase":
        if order < 1:
            raise UserError(f"--order must be >= 1, got {order}")
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) > 0]
        if not seqs:
            raise UserError("no token ids to fit the n-gram base on: the ids file has no non-empty 'ids'")
        top = max(int(s.max()) for s in seqs)
        if vocab_size is None:
            vocab_size = top + 1
        if top >= vocab_size or min(int(s.min()) for s in seqs) < 0:
            raise UserError(f"token ids must lie in [0, {vocab_size}): pass the target's --vocab-size")
        n, pad, radix = order, vocab_size, vocab_size + 1
        # windows [M, n]: each real token with its n - 1 predecessors (pads before the start)
        windows = np.concatenate([
            np.lib.stride_tricks.sliding_window_view(np.concatenate([np.full(n - 1, pad), s]), n)
            for s in seqs
        ])
        levels: list[_Level] = []
        rows_by_level: list[np.ndarray] = []
        for m in range(1, n + 1):
            grams = windows[:, n - m:]                                             # [M, m]
            keys, first, raw = np.unique(cls._keys(levels, grams, radix), return_index=True, return_counts=True)
            rows = np.concatenate([grams[first], np.full((1, m), pad)])          # + the all-pad m-gram
            keys = np.concatenate([keys, cls._keys(levels, rows[-1:], radix)])
            raw = np.concatenate([raw, [0]])
            order_idx = np.argsort(keys)
            rows_by_level.append(rows[order_idx])
            num_ctx = len(levels[-1].keys) if levels else 1
            levels.append(_Level(keys[order_idx], raw[order_idx], np.zeros(len(keys), np.int64), num_ctx, radix))
        for m in range(1, n):  # continuation counts of order m from the distinct (m+1)-grams seen
            seen = rows_by_level[m][levels[m].raw > 0]                              # [G', m + 1]
            suffix = levels[m - 1].find(cls._keys(levels, seen[:, 1:], radix))
            levels[m - 1].cont = np.bincount(suffix, minlength=len(levels[m - 1].keys))
        levels = [
            _Level(lv.keys, lv.raw, lv.cont, len(levels[i - 1].keys) if i else 1, radix)
            for i, lv in enumerate(levels)
        ]
        meta = {"num_sequences": len(seqs), "num_tokens": int(sum(len(s) for s in seqs))}
        return cls(order, vocab_size, levels, meta)

    @staticmethod
    def _keys(levels: list[_Level], rows: np.ndarray, radix: int) -> np.ndarray:
        """Keys of m-gram rows [L, m] given the tables of orders 1..m-1 (-1 where a prefix is unknown)."""
        m = rows.shape[1]
        prefix = np.zeros(len(rows), np.int64)
        for k in range(1, m):
            found = levels[k - 1].find(prefix * radix + rows[:, k - 1]) if k > 1 else levels[0].find(rows[:, 0])
            prefix = np.where(prefix >= 0, found, -1)
        return np.where(prefix >= 0, prefix * radix + rows[:, m - 1], -1)

    def _context_ids(self, hist: np.ndarray, m: int) -> np.ndarray:
        """Index in the order-m table of the last m tokens of each history row [L, order - 1]; -1 if unseen."""
        rows = hist[:, hist.shape[1] - m:]
        keys = self._keys(self.levels, rows, self.radix)
        return np.where(keys >= 0, self.levels[m - 1].find(keys), -1)

    # ---------------------------------------------------------------- scoring
    def _prob(self, hist: np.ndarray, tokens: np.ndarray, eff: np.ndarray) -> np.ndarray:
        """P(tokens | hist) [L] under the model of order eff [L] (1..order) per query."""
        lv1 = self.levels[0]
        idx = lv1.find(tokens)
        cont_c = np.where(idx >= 0, lv1.cont[idx], 0)
        raw_c = np.where(idx >= 0, lv1.raw[idx], 0)
        floor = 1.0 / self.vocab_size

        def interp(count, tot, types, d, lower):
            safe = np.maximum(tot, 1)
            val = np.maximum(count - d, 0) / safe + d * types / safe * lower
            return np.where(tot > 0, val, lower)

        p_cont = interp(cont_c, lv1.cont_tot[0], lv1.cont_types[0], lv1.d_cont, floor)
        out = interp(raw_c, lv1.raw_tot[0], lv1.raw_types[0], lv1.d_raw, floor)
        for m in range(2, self.order + 1):
            lv = self.levels[m - 1]
            ctx = self._context_ids(hist, m - 1)                                  # [L]
            found = lv.find(np.where(ctx >= 0, ctx * self.radix + tokens, -1))
            ok = ctx >= 0
            c = np.where(ok, ctx, 0)
            raw_c = np.where(found >= 0, lv.raw[found], 0)
            p_raw = interp(raw_c, np.where(ok, lv.raw_tot[c], 0), lv.raw_types[c], lv.d_raw, p_cont)
            out = np.where(eff == m, p_raw, out)
            if m < self.order:
                cont_c = np.where(found >= 0, lv.cont[found], 0)
                p_cont = interp(cont_c, np.where(ok, lv.cont_tot[c], 0), lv.cont_types[c], lv.d_cont, p_cont)
        return out

    def neg_log_prob(self, context_ids, token_ids, context_len=None) -> np.ndarray:
        """-log q_base(token_i | preceding tokens) [L] for consecutive tokens following context_ids.

        context_len: optional [L] cap on how many preceding tokens (context included) token i may see;
        a capped token is scored by the order cap + 1 model with no padding. Uncapped tokens see the last
        order - 1 tokens, with the start-of-sequence pad where there are fewer (as in fitting).
        """
        ctx = np.asarray(context_ids, dtype=np.int64).reshape(-1)
        tok = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if len(tok) == 0:
            return np.zeros(0)
        both = np.concatenate([ctx, tok])
        if both.min() < 0 or both.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        n = self.order
        seq = np.concatenate([np.full(n - 1, self.pad), ctx, tok])
        if n > 1:   # hist [L, n - 1]: the n - 1 ids before each token
            hist = np.lib.stride_tricks.sliding_window_view(seq[:-1], n - 1)[len(ctx):]
        else:
            hist = np.zeros((len(tok), 0), np.int64)
        eff = np.full(len(tok), n)
        if context_len is not None:
            cap = np.asarray(context_len, dtype=np.int64).reshape(-1)
            if cap.shape != tok.shape:
                raise ValueError("context_len must have one entry per token")
            avail = len(ctx) + np.arange(len(tok))
            eff = np.minimum(np.minimum(cap, avail), n - 1) + 1
        return -np.log(self._prob(np.ascontiguousarray(hist), tok, eff))

    def distribution(self, context_ids, context_len: int | None = None) -> np.ndarray:
        """q_base(. | context) over the whole vocabulary [V] (for checks; O(V) work)."""
        V = self.vocab_size
        ctx = np.asarray(context_ids, dtype=np.int64).reshape(-1)
        n = self.order
        last = np.concatenate([np.full(n - 1, self.pad), ctx])[len(ctx):] if n > 1 else np.zeros(0, np.int64)
        hist = np.broadcast_to(last, (V, n - 1)).copy()
        eff = np.full(V, n)
        if context_len is not None:
            eff[:] = min(context_len, len(ctx), n - 1) + 1
        return self._prob(hist, np.arange(V, dtype=np.int64), eff)

    # ---------------------------------------------------------------- files
    def save(self, path) -> None:
        from safetensors.numpy import save_file

        tensors = {}
        for m, lv in enumerate(self.levels, start=1):
            tensors[f"keys.{m}"] = lv.keys
            tensors[f"raw.{m}"] = lv.raw.astype(np.int64)
            tensors[f"cont.{m}"] = lv.cont.astype(np.int64)
        meta = {"format": "spec-harness-ngram-kn/1", "order": str(self.order),
                "vocab_size": str(self.vocab_size), "meta": json.dumps(self.meta)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "NgramBase":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise UserError(f"n-gram base {path} not found: make one with `spec-harness fit-base`")
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != "spec-harness-ngram-kn/1":
                raise UserError(f"{path} is not an n-gram base written by `spec-harness fit-base`")
            order, V = int(meta["order"]), int(meta["vocab_size"])
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
        levels: list[_Level] = []
        for m in range(1, order + 1):
            num_ctx = len(levels[-1].keys) if levels else 1
            levels.append(_Level(arrays[f"keys.{m}"], arrays[f"raw.{m}"], arrays[f"cont.{m}"], num_ctx, V + 1))
        return cls(order, V, levels, json.loads(meta.get("meta", "{}")))


# -------------------------------------------------------------------- CLI: spec-harness fit-base
def read_id_sequences(path) -> list[list[int]]:
    """Token-id sequences from a JSONL file: key "ids" (one list) or "output_ids" (a list of lists, as in
    a run's prompts.jsonl)."""
    from harness.records import read_jsonl

    path = Path(path)
    if not path.exists():
        raise UserError(f"ids file {path} not found")
    seqs: list[list[int]] = []
    for rec in read_jsonl(path):
        if "ids" in rec:
            seqs.append([int(t) for t in rec["ids"]])
        elif "output_ids" in rec:
            seqs.extend([int(t) for t in ids] for ids in rec["output_ids"])
    if not seqs:
        raise UserError(f"{path} has no lines with key 'ids' (or 'output_ids'): write one JSON object per line")
    return seqs


def _cmd_fit_base(args) -> int:
    from harness.records import check_out_file

    check_out_file(args.out)
    seqs = read_id_sequences(args.ids)
    base = NgramBase.fit(seqs, order=args.order, vocab_size=args.vocab_size)
    base.meta["source"] = str(args.ids)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    base.save(args.out)
    sizes = ", ".join(f"{m}-grams {len(lv.keys)}" for m, lv in enumerate(base.levels, start=1))
    print(f"fit-base: {base.meta['num_tokens']} tokens in {base.meta['num_sequences']} sequences; {sizes} "
          f"-> {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("fit-base", help="fit the meter's n-gram base q_base on target-generated token ids")
    p.add_argument("--ids", required=True,
                   help="JSONL, one sequence a line: key 'ids' (target-generated token ids) or a run's prompts.jsonl")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--order", type=int, default=3, help="n-gram order (context = order - 1 tokens)")
    p.add_argument("--vocab-size", type=int, required=True, help="the target's vocabulary size")
    p.set_defaults(func=_cmd_fit_base)
