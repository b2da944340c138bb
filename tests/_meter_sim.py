"""Synthetic sources and a vectorised speculative-sampling simulator for the meter tests (CPU).

MarkovSource: an order-k Markov chain over V symbols with a random transition tensor P [V]*k + [V]; the
"target" knows it exactly (its p at each step is the true conditional), so information quantities have
closed forms from P and the stationary distribution of the chain on k-tuples.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.meter.core import Meter, step_stats


def _entropy(joint: np.ndarray) -> float:
    j = joint[joint > 0]
    return float(-(j * np.log(j)).sum())


class MarkovSource:
    def __init__(self, V: int, k: int, seed: int, concentration: float = 0.3):
        rng = np.random.default_rng(seed)
        self.V, self.k = V, k
        self.P = rng.dirichlet(np.full(V, concentration), size=V ** k).reshape((V,) * k + (V,))
        self.pi = self._stationary()                                   # [V]*k

    def _stationary(self) -> np.ndarray:
        V, k = self.V, self.k
        S = V ** k
        T = np.zeros((S, S))
        flat = self.P.reshape(S, V)
        for s in range(S):
            for w in range(V):
                T[s, (s * V + w) % S] += flat[s, w]                      # drop the oldest token, append w
        vals, vecs = np.linalg.eig(T.T)
        v = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
        return (v / v.sum()).reshape((V,) * k)

    def joint(self, n_future: int) -> np.ndarray:
        """Stationary joint of (state = k previous tokens, the next n_future tokens) [V]*(k + n_future)."""
        J = self.pi
        for _ in range(n_future):
            d = J.ndim
            Pb = self.P.reshape((1,) * (d - self.k) + self.P.shape)
            J = J[..., None] * Pb
        return J

    def cond_entropy(self, m: int) -> float:
        """H(W_t | the m previous tokens), m <= k."""
        J = self.joint(1).sum(axis=tuple(range(self.k - m)))          # [V]*(m + 1)
        return _entropy(J) - _entropy(J.sum(-1))

    def window_surplus(self, K: int) -> float:
        """The paper's surplus I(H_t; W_{t+1}..W_{t+K-1} | W_t) with H_t = the chain's state, from P."""
        J = self.joint(K)                                              # [S.., W_t, .., W_{t+K-1}]
        ax_state = tuple(range(self.k))
        w = J.sum(axis=ax_state)                                       # [W_t..]
        h_future_given_wt = _entropy(w) - _entropy(w.sum(axis=tuple(range(1, K))))
        sw = J.sum(axis=tuple(range(self.k + 1, self.k + K)))          # [S.., W_t]
        h_future_given_state_wt = _entropy(J) - _entropy(sw)
        return h_future_given_wt - h_future_given_state_wt

    def sample(self, n_seq: int, length: int, seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        P = torch.from_numpy(self.P.reshape(-1, self.V))
        toks = self.sample_states(n_seq, g)                            # [n, k]
        out = [toks]
        last = toks
        cdf = P.cumsum(-1)                                             # [V^k, V]
        u = torch.rand(length, n_seq, 1, generator=g, dtype=torch.float64)
        for t in range(length):
            w = torch.searchsorted(cdf[self._flat(last)], u[t]).clamp(max=self.V - 1)
            out.append(w)
            last = torch.cat([last[:, 1:], w], 1)
        return torch.cat(out, 1).tolist()

    def sample_states(self, n: int, g: torch.Generator) -> torch.Tensor:
        flat = torch.multinomial(torch.from_numpy(self.pi.reshape(-1)), n, replacement=True, generator=g)
        digits = [(flat // self.V ** (self.k - 1 - i)) % self.V for i in range(self.k)]
        return torch.stack(digits, 1)                                  # [n, k]

    def _flat(self, last: torch.Tensor) -> torch.Tensor:
        idx = torch.zeros(last.shape[0], dtype=torch.long)
        for i in range(self.k):
            idx = idx * self.V + last[:, i]
        return idx


def simulate(source: MarkovSource, draft_table: np.ndarray | None, K: int, B: int, steps: int, seed: int,
             meter: Meter | None = None, ragged: bool = True, one_hot: bool = False):
    """Speculative sampling at temperature 1 with the exact target and an order-1 drafter.

    draft_table [V, V] q(. | previous token) (or [B, V, V], one per sequence), or None: the drafter is
    the target itself (q = p; every draft is accepted). one_hot: draft the argmax of the table and pass
    q = None (a drafter with no q).
    Returns committed tokens per sequence, the initial contexts, and per step (num_draft, num_accepted)
    as [S, B] arrays; the meter (if given) has observed every step.
    """
    g = torch.Generator().manual_seed(seed)
    V, k = source.V, source.k
    P = torch.from_numpy(source.P.reshape(-1, V))                      # [V^k, V]
    Q = None if draft_table is None else torch.from_numpy(draft_table)
    state = source.sample_states(B, g)                                 # [B, k] last k tokens
    contexts = state.tolist()
    committed: list[list[int]] = [[] for _ in range(B)]
    nds, accs = [], []
    bar = torch.arange(B)
    if meter is not None:
        meter.begin(B)
    for _ in range(steps):
        nd = torch.randint(0, K + 1, (B,), generator=g) if ragged else torch.full((B,), K)
        ps = torch.zeros(B, K + 1, V, dtype=torch.float64)
        qs = torch.zeros(B, K, V, dtype=torch.float64)
        drafts = torch.zeros(B, K, dtype=torch.long)
        cur = state.clone()
        for d in range(K + 1):
            ps[:, d] = P[source._flat(cur)]
            if d == K:
                break
            if Q is None:
                q = ps[:, d]
            else:
                q = Q[bar, cur[:, -1]] if Q.dim() == 3 else Q[cur[:, -1]]
            if one_hot:
                x = q.argmax(-1)
                q = torch.nn.functional.one_hot(x, V).double()
            else:
                x = torch.multinomial(q, 1, generator=g).squeeze(1)
            qs[:, d], drafts[:, d] = q, x
            cur = torch.cat([cur[:, 1:], x[:, None]], 1)
        u = torch.rand(B, K, generator=g, dtype=torch.float64)
        px = ps[:, :K].gather(2, drafts[..., None]).squeeze(2)
        qx = qs.gather(2, drafts[..., None]).squeeze(2)
        ok = (u * qx < px) & (torch.arange(K)[None] < nd[:, None])
        acc = ok.long().cumprod(1).sum(1)                              # [B]
        if K:
            row = acc.clamp(max=K - 1)
            resid = (ps[bar, row] - qs[bar, row]).clamp_min(0)        # normalised by multinomial
        else:
            resid = ps[:, 0]
        final_dist = torch.where((acc < nd)[:, None], resid, ps[bar, acc])
        last = torch.multinomial(final_dist, 1, generator=g).squeeze(1)
        if meter is not None:
            cu = torch.cat([torch.zeros(1, dtype=torch.long), nd.cumsum(0)])
            mask_q = torch.arange(K)[None] < nd[:, None]
            mask_p = torch.arange(K + 1)[None] <= nd[:, None]
            shift = torch.randn(B, K + 1, 1, generator=g, dtype=torch.float64)  # logits are log p + const
            logits = (ps.log() + shift)[mask_p]
            stats = step_stats(logits, None if one_hot else qs[mask_q], drafts[mask_q], cu, acc, last, 1.0)
            meter.observe(stats, cu, acc, has_q=not one_hot)
        toks = torch.cat([drafts, torch.zeros(B, 1, dtype=torch.long)], 1)   # [B, K+1] committed, padded
        toks[bar, acc] = last
        full = torch.cat([state, toks], 1)                             # [B, k + K + 1]
        state = full.gather(1, (acc + 1)[:, None] + torch.arange(k)[None])
        for b, (row, a) in enumerate(zip(toks.tolist(), acc.tolist())):
            committed[b].extend(row[: a + 1])
        nds.append(nd.numpy())
        accs.append(acc.numpy())
    return committed, contexts, np.stack(nds), np.stack(accs)


def bootstrap_mean_ci(x: np.ndarray, level: float, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling in chunks of 100 to bound memory)."""
    rng = np.random.default_rng(seed)
    means = np.concatenate([x[rng.integers(0, len(x), size=(100, len(x)))].mean(1) for _ in range(reps // 100)])
    lo = (1 - level) / 2
    return float(np.quantile(means, lo)), float(np.quantile(means, 1 - lo))


def flatten(records: list[list[dict]], key: str, depth: int | None = None) -> np.ndarray:
    """All non-null values of a meter field (optionally at one 1-based depth) as an array."""
    vals = []
    for seq in records:
        for step in seq:
            lst = step[key]
            sel = lst if depth is None else lst[depth - 1: depth]
            vals.extend(v for v in sel if v is not None)
    return np.asarray(vals, dtype=np.float64)
