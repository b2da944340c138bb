"""The information-surplus meter: per step and per committed depth j, what the target and the drafter
knew about the tokens the step committed, in nats.

Background (arXiv 2507.19247 v2, section 4.1, eqs 4.1-4.2): the target's hidden state H_t carries
information about tokens beyond the next one,
    I(H_t; W_t..W_{t+K-1}) = I(H_t; W_t) + I(H_t; W_{t+1}..W_{t+K-1} | W_t),
and the second term, the information surplus, lies between 0 and H(W_{t+1}..W_{t+K-1} | W_t). The
paper defines it but gives no estimator; everything below that turns it into numbers is OURS.
Prop. 4.2 (with KL as divergence, a head's categorical entropy is the Shannon entropy of its
distribution) and the paper's remark that a drafter's head is plausibly more uncertain than the
verifying head are what h_draft vs h_verify tests.

Logged along the committed tokens of a step only (depth j = 1..emitted), at the temperature actually
used; when decoding is greedy, p is the temperature-1 softmax (the kernel's t_eff = 1) and the
quantities describe that distribution, not the argmax rule that chose the tokens:

A step starting at position t commits W_t, W_{t+1}, ...; depth j holds W_{t+j-1}, p_j and q_j are
the target's and the drafter's distributions for it.

  h_verify_j     H(p_j), entropy of the target's distribution at depth j
  h_draft_j      H(q_j), entropy of the drafter's distribution (null for one-hot drafters and bonus tokens)
  ce_draft_j     -log q_j(w), w the committed token (q clamped at 1e-30)
  ce_base_j      -log q_base(w | W_t..W_{t+j-2}), q_base the n-gram of harness.meter.ngram_base, conditioned
                 only on tokens committed earlier in the same step (the last order - 1 of them; none at j = 1)
  kl_j, tv_j     KL(p_j || q_j) and total variation; alpha_theory_j = sum min(p_j, q_j) = 1 - tv_j,
                 the acceptance probability of one draft under speculative sampling (Leviathan et al. 2023;
                 a tree that tries several children accepts more often than this)
  surplus_ub_j   ce_base_j - h_verify_j
  surplus_use_j  ce_base_j - ce_draft_j, predictive V-information of the drafter (Xu et al. 2020)

Our estimator. Sampling at temperature 1, the committed token at depth j is distributed as p_j given
everything before it, so
    E[surplus_ub_j] = E KL(p_j || q_base)
                   >= H(W_{t+j-1} | W_t..W_{t+j-2}) - H(W_{t+j-1} | H_t, W_t..W_{t+j-2}),
because the base sees at most those in-step tokens and is not the true conditional (cross-entropy >=
entropy), and the target's state at depth j knows at least H_t and those tokens. Averaged over steps
that reached depth j, surplus_ub_j thus bounds the j-th chain-rule term of eq. 4.1 from above (j = 1:
I(H_t; W_t); j >= 2: the terms of the surplus), and its sum over j >= 2 bounds the surplus of the
step's committed window. The bound is tight when the base is the exact conditional and the target's
state adds nothing beyond H_t and the window (tests/test_meter_synthetic.py checks both cases against
closed forms). Averages are conditional on reaching depth j: acceptance selects easier contexts.
With greedy decoding the committed tokens are not draws from p and the bound does not apply.

Data path: verification (spec_kernels) returns a stats dict per step (see `step_stats` for the keys);
`Meter.observe` packs it into a preallocated device buffer with one torch.cat and no host sync;
`Meter.flush` copies the buffer to the host once per prompt, lays the steps out by committed depth and
adds ce_base from the n-gram there.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.meter.ngram_base import NgramBase
from harness.records import METER_FIELDS

_Q_FLOOR = 1e-30
# channels per (step, sequence, depth), in the order of _ROW below; _Q holds q(committed token)
_H_VERIFY, _H_DRAFT, _Q, _KL, _ALPHA = range(5)


# ------------------------------------------------------------------ stats from full distributions
def row_stats(logits: torch.Tensor, q: torch.Tensor | None, draft_ids: torch.Tensor, temperature: float) -> dict:
    """Per draft row stats from full distributions, in float64.

    logits [R, V] target logits at each draft row; q [R, V] drafter distribution or None (one-hot);
    draft_ids [R]. p = softmax(logits / t_eff), t_eff = temperature if > 0 else 1.
    Returns p_draft, q_draft, alpha, entropy_p, entropy_q, kl: each [R].
    """
    t_eff = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits.double() / t_eff, dim=-1)                  # [R, V]
    p = logp.exp()
    ids = draft_ids.long().view(-1, 1)                                          # [R, 1]
    p_x = p.gather(1, ids).squeeze(1)                                          # [R]
    out = {"p_draft": p_x, "entropy_p": -torch.special.xlogy(p, p).sum(-1)}
    if q is None:
        out.update(q_draft=torch.ones_like(p_x), entropy_q=torch.zeros_like(p_x),
                   kl=torch.full_like(p_x, math.nan), alpha=p_x.clone())
        return out
    q = q.double()                                                             # [R, V]
    out.update(
        q_draft=q.gather(1, ids).squeeze(1),
        entropy_q=-torch.special.xlogy(q, q).sum(-1),
        kl=(torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1),
        alpha=torch.minimum(p, q).sum(-1),
    )
    return out


def step_stats(logits: torch.Tensor, q: torch.Tensor | None, draft_ids: torch.Tensor,
               cu_num_draft: torch.Tensor, num_accepted: torch.Tensor, last_ids: torch.Tensor,
               temperature: float) -> dict:
    """The verification stats dict (same keys as spec_kernels) from full logits, in float64.

    For tests and for paths without kernel stats. Ragged layout: request b owns draft rows cu[b]..cu[b+1]-1 of q [N, V] and draft_ids [N], and
    target rows cu[b]+b .. cu[b+1]+b of logits [N + B, V] (one per draft plus the bonus row).
    num_accepted [B]; last_ids [B] the final emitted token (recovered or bonus).
    Per row [N]: p_draft, q_draft, alpha, entropy_p, entropy_q, kl.
    Per request [B]: entropy_p_last (H(p) at the final token's row), p_emitted (p of the final token),
    q_emitted (q of a recovered token under its row's q; 0 for one-hot; NaN for a bonus token).
    """
    dev = logits.device
    cu = cu_num_draft.to(dev).long()
    acc = num_accepted.to(dev).long()
    B = acc.shape[0]
    N = draft_ids.shape[0]
    rows = torch.arange(N, device=dev)
    req = torch.searchsorted(cu[1:], rows, right=True)                        # [N] request of each row
    out = row_stats(logits[rows + req], q, draft_ids, temperature)
    t_eff = temperature if temperature > 0 else 1.0
    barange = torch.arange(B, device=dev)
    logp_last = torch.log_softmax(logits[cu[:-1] + barange + acc].double() / t_eff, dim=-1)  # [B, V]
    p_last = logp_last.exp()
    last = last_ids.to(dev).long().view(-1, 1)
    out["entropy_p_last"] = -torch.special.xlogy(p_last, p_last).sum(-1)
    out["p_emitted"] = p_last.gather(1, last).squeeze(1)
    recovered = acc < cu[1:] - cu[:-1]                                          # [B]
    if q is None:
        q_rec = torch.zeros(B, dtype=torch.float64, device=dev)
    elif N == 0:
        q_rec = torch.full((B,), math.nan, dtype=torch.float64, device=dev)
    else:
        qrow = (cu[:-1] + acc).clamp(max=N - 1)
        q_rec = q.double()[qrow].gather(1, last).squeeze(1)
    out["q_emitted"] = torch.where(recovered, q_rec, torch.full_like(q_rec, math.nan))
    return out


# ------------------------------------------------------------------ the meter
_ROW = ("entropy_p", "entropy_q", "q_draft", "kl", "alpha")    # per draft row [N] (chains), per node [B, T] (trees)
_REQUEST = ("entropy_p_last", "q_emitted")                     # per request [B]


class Meter:
    """Accumulates verification stats on the device with no host sync per step; one transfer per flush.

    observe packs the step's stats into a preallocated flat float32 device buffer with one torch.cat
    (the buffer grows if a prompt outlives max_steps); flush copies it to the host once and lays the
    steps out by committed depth there.
    """

    def __init__(self, device, max_steps: int, max_depth: int, enabled: bool = True,
                 base: NgramBase | None = None):
        self.device = torch.device(device)
        self.max_steps = max(1, int(max_steps))   # steps per prompt the buffer is sized for
        self.max_depth = int(max_depth)           # most draft tokens per request and step (chain K, tree depth)
        self.enabled = enabled
        self.base = base
        self._buf: torch.Tensor | None = None     # [capacity] float32 packed steps
        self._steps: list[tuple] = []             # per step: (offset, ("chain", N) or ("tree", T, D), has_q)
        self._off = 0
        self._batch = 0

    def begin(self, batch_size: int) -> None:
        """Start of a prompt (or batch): forget earlier steps."""
        if not self.enabled:
            return
        self._batch = B = int(batch_size)
        per_step = len(_ROW) * B * max(self.max_depth, 1) + (len(_REQUEST) + 2) * B + 1   # a chain step
        if self._buf is None or self._buf.numel() < self.max_steps * per_step:
            self._buf = torch.empty(self.max_steps * per_step, device=self.device)
        self._steps, self._off = [], 0

    def observe(self, stats: dict, cu_num_draft: torch.Tensor | None, num_accepted: torch.Tensor,
                has_q: bool) -> None:
        """Record one step (device tensors only; shapes are read on the host, values never).

        Chains: per draft row stats [N] in the ragged layout of cu_num_draft [B+1]. Trees (cu_num_draft
        None): per node stats [B, T] plus stats["path"] [B, D+1] (accepted nodes, root first, padded -1)
        and stats["parents"] [B, T], which verification adds as it adds cu_num_draft for chains.
        """
        if not self.enabled:
            return
        if self._buf is None:
            raise RuntimeError("Meter.observe before Meter.begin")
        B = self._batch
        if num_accepted.shape[0] != B:
            raise ValueError(f"Meter.begin got batch {B}, observe got {num_accepted.shape[0]} requests")
        if cu_num_draft is None:
            if "path" not in stats or "parents" not in stats:
                raise ValueError("tree steps need stats['path'] and stats['parents'] (verification adds them)")
            T, D = stats["parents"].shape[1], stats["path"].shape[1] - 1
            parts = [stats[k] for k in _ROW] + [stats[k] for k in _REQUEST] + [stats["path"], stats["parents"]]
            sizes = ("tree", T, D)
        else:
            N = stats["entropy_p"].shape[0]
            parts = [stats[k] for k in _ROW] + [stats[k] for k in _REQUEST] + [cu_num_draft]
            sizes = ("chain", N)
        parts.append(num_accepted)
        n = sum(t.numel() for t in parts)
        if self._off + n > self._buf.numel():
            grown = torch.empty(max(2 * self._buf.numel(), self._off + n), device=self.device)
            grown[: self._off].copy_(self._buf[: self._off])
            self._buf = grown
        torch.cat([t.reshape(-1) for t in parts], out=self._buf[self._off: self._off + n])
        self._steps.append((self._off, sizes, bool(has_q)))
        self._off += n

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def _unpack(self) -> tuple[np.ndarray, np.ndarray]:
        """The one host transfer; returns vals [S, B, D1, 5] (channels _ROW, q as a probability; NaN where
        undefined) and num_accepted [S, B]."""
        B = self._batch
        host = self._buf[: self._off].cpu().numpy().astype(np.float64)
        bar = np.arange(B)
        steps = []
        for off, sizes, _ in self._steps:
            if sizes[0] == "chain":
                N = sizes[1]
                rows, rest = host[off: off + 5 * N].reshape(5, N).T, off + 5 * N   # [N, 5]
                req, rest = host[rest: rest + 2 * B].reshape(2, B), rest + 2 * B
                cu = host[rest: rest + B + 1].astype(np.int64)
                acc = host[rest + B + 1: rest + 2 * B + 1].astype(np.int64)
                owner = np.searchsorted(cu[1:], np.arange(N), side="right")          # [N] request of each row
                depth = np.arange(N) - cu[owner]                                      # [N] 0-based
                final_row = np.full((B, 5), np.nan)                                   # recovered: its draft row
                mask = acc < cu[1:] - cu[:-1]
                final_row[mask] = rows[cu[:-1][mask] + acc[mask]]
            else:
                T, D = sizes[1], sizes[2]
                nodes5, rest = host[off: off + 5 * B * T].reshape(5, B, T), off + 5 * B * T
                req, rest = host[rest: rest + 2 * B].reshape(2, B), rest + 2 * B
                path = host[rest: rest + B * (D + 1)].reshape(B, D + 1).astype(np.int64)
                rest += B * (D + 1)
                parents = host[rest: rest + B * T].reshape(B, T).astype(np.int64)
                acc = host[rest + B * T: rest + B * T + B].astype(np.int64)
                node = path[:, 1:]                                                    # [B, D] accepted nodes
                owner, depth = np.nonzero(node >= 0)
                rows = nodes5[:, owner, node[owner, depth]].T                        # [M, 5]
                last = path[bar, acc]                                                 # last accepted node
                child = parents == last[:, None]                                      # its children carry its row
                final_row = np.where(child.any(1)[:, None], nodes5[:, bar, child.argmax(1)].T, np.nan)
            steps.append((owner, depth, rows, req, acc, final_row))
        deepest = max([self.max_depth] + [int(st[4].max()) for st in steps] + [int(st[1].max()) for st in steps
                                                                                if len(st[1])])
        vals = np.full((len(steps), B, deepest + 1, 5), np.nan)
        accs = np.zeros((len(steps), B), np.int64)
        for s, (owner, depth, rows, req, acc, final_row) in enumerate(steps):
            vals[s, owner, depth] = rows
            vals[s, bar, acc] = final_row                     # a recovered token: its row's q-side stats
            vals[s, bar, acc, _H_VERIFY] = req[0]             # entropy_p_last
            vals[s, bar, acc, _Q] = req[1]                    # q_emitted (NaN for a bonus token)
            accs[s] = acc
        return vals, accs

    def flush(self, committed_ids: list[list[int]], contexts: list[list[int]]) -> list[list[dict]]:
        """Per sequence, per observed step, a dict of lists over committed depth j = 1..emitted.

        committed_ids[b]: the tokens the observed steps of sequence b emitted, in order (a sequence that
        stopped early has fewer: later steps are dropped, a step cut short is truncated). A token no
        observed step emitted (e.g. one sampled by the prefill) belongs at the end of contexts[b].
        contexts[b]: the ids before them (prompt). Keys: METER_FIELDS; None where undefined.
        """
        if not self.enabled or self._buf is None:
            return [[] for _ in committed_ids]
        if len(committed_ids) != self._batch or len(contexts) != self._batch:
            raise ValueError(f"flush needs {self._batch} sequences, got {len(committed_ids)} and {len(contexts)}")
        if not self._steps:
            return [[] for _ in committed_ids]
        vals, acc = self._unpack()
        has_q = np.asarray([h for *_, h in self._steps], dtype=bool)    # [S]
        out: list[list[dict]] = []
        for b in range(self._batch):
            ids = list(committed_ids[b])
            emitted = acc[:, b] + 1
            if int(emitted.sum()) < len(ids):
                raise ValueError(
                    f"sequence {b}: {len(ids)} committed ids but the observed steps emitted {int(emitted.sum())}; "
                    "put tokens no observed step emitted (e.g. the prefill's) into contexts")
            ends = np.minimum(np.cumsum(emitted), len(ids))
            lens = np.diff(ends, prepend=0)
            lens = lens[lens > 0]                                      # [S_b] tokens of each kept step
            step_of = np.repeat(np.arange(len(lens)), lens)            # [L] step of each committed token
            depth0 = np.arange(len(ids)) - np.repeat(np.cumsum(lens) - lens, lens)  # [L] 0-based depth
            v = vals[step_of, b, depth0]                               # [L, 5]
            if self.base is not None and len(ids):
                ce_base = self.base.neg_log_prob(contexts[b], ids, context_len=depth0)
            else:
                ce_base = np.full(len(ids), np.nan)
            q_ok = np.where(has_q[step_of], 1.0, np.nan)               # draft-side fields need a q
            h_verify, alpha = v[:, _H_VERIFY], v[:, _ALPHA] * q_ok
            ce_draft = -np.log(np.maximum(v[:, _Q], _Q_FLOOR)) * q_ok  # NaN stays NaN
            fields = {
                "h_verify": h_verify, "h_draft": v[:, _H_DRAFT] * q_ok, "ce_draft": ce_draft,
                "ce_base": ce_base, "kl": v[:, _KL] * q_ok, "tv": 1.0 - alpha, "alpha_theory": alpha,
                "surplus_ub": ce_base - h_verify, "surplus_use": ce_base - ce_draft,
            }
            bounds = np.cumsum(lens).tolist()
            spans = list(zip([0] + bounds[:-1], bounds))
            per_field = [[lst[lo:hi] for lo, hi in spans] for lst in (_as_list(fields[k]) for k in METER_FIELDS)]
            out.append([dict(zip(METER_FIELDS, vals_)) for vals_ in zip(*per_field)])
        return out


def _as_list(x: np.ndarray) -> list:
    """Rounded to 1e-6 nats; NaN and inf (undefined, or a q that underflowed) become None."""
    return [v if v == v else None for v in np.where(np.isfinite(x), np.round(x, 6), np.nan).tolist()]


def build_meter(cfg, target) -> Meter:
    """The run's meter: on the target's device, deep enough for chains of cfg.k and trees of cfg.depth;
    with the n-gram base of cfg.meter_base (from `spec-harness fit-base`) when one is given."""
    from harness.errors import UserError

    path = getattr(cfg, "meter_base", None)
    base = NgramBase.load(path) if path else None
    if base is not None and base.vocab_size != target.vocab_size:
        raise UserError(f"n-gram base {path} has vocabulary {base.vocab_size}, the target {target.vocab_size}: "
                        "fit it again with --vocab-size of this target")
    depth = max(cfg.k, cfg.depth or 0, 8)
    return Meter(target.device, max_steps=cfg.max_new_tokens + 1, max_depth=depth, enabled=cfg.meter, base=base)
