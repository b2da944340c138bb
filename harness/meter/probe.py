"""`spec-harness probe`: how much a single hidden state H_t of the target knows about the token after next.

The version of the surplus faithful to the paper's single H_t (arXiv 2507.19247 section 4.1): for each
layer l, two matched probes are trained on the target's hidden states h_t (output of decoder layer l at
position t, which predicts w_{t+1}):
    with H:     q(w_{t+2} | h_t, w_{t+1})
    without H:  q(w_{t+2} | w_{t+1})
and the difference of their held-out cross-entropies (nats/token) estimates I(H_t; W_{t+2} | W_{t+1}),
the first term of the surplus. This estimator is OURS (the paper gives none). Strictly it is predictive
V-information (Xu et al. 2020) for the probe family below, on a coarsened vocabulary: tokens seen fewer
than `min_count` times in the training split share one "other" class, in the inputs and the outputs.

The probes are matched: the same network, a learned embedding of w_{t+1} concatenated with a low-rank
projection of LayerNorm(h_t), then a small MLP over the classes; the probe without H gets zeros in place
of the projection. The text is cut into chunks of --ctx tokens, each run through the target from an
empty cache; chunks are split into train / validation / test; training stops early on the validation
cross-entropy; the interval is a bootstrap over test chunks (paired per token).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.errors import UserError
from harness.records import check_out_dir


@dataclass
class ProbeConfig:
    embed: int = 64            # learned embedding of w_{t+1}
    rank: int = 64             # low-rank projection of h_t
    hidden: int = 128          # MLP width
    min_count: int = 2         # rarer tokens (in the training split) share the class "other"
    epochs: int = 40           # most passes over the training split
    patience: int = 4          # stop after this many epochs without a better validation CE
    batch: int = 512
    lr: float = 5e-3
    weight_decay: float = 1e-4
    val_frac: float = 0.15     # fractions of chunks held out for early stopping and for the estimate
    test_frac: float = 0.25
    seed: int = 0


@dataclass
class CollectConfig:
    max_tokens: int = 4096     # tokens run through the target (about a minute for SmolLM2-135M on 2 CPU cores)
    ctx: int = 128             # chunk length (tokens of context per forward row)
    batch: int = 4             # chunks per forward
    layers: tuple[int, ...] = field(default_factory=tuple)   # empty: five layers spread over the depth


PRESETS = {
    "quick": ProbeConfig(epochs=15, hidden=64, patience=2),
    "default": ProbeConfig(),
}


class _Probe(nn.Module):
    def __init__(self, n_in: int, n_out: int, h_dim: int, cfg: ProbeConfig):
        super().__init__()
        self.rank = cfg.rank
        self.emb = nn.Embedding(n_in, cfg.embed)
        self.proj = nn.Sequential(nn.LayerNorm(h_dim), nn.Linear(h_dim, cfg.rank)) if h_dim else None
        self.mlp = nn.Sequential(nn.Linear(cfg.embed + cfg.rank, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, n_out))

    def forward(self, w1: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        z = self.emb(w1)                                                       # [M, E]
        hz = self.proj(h) if self.proj is not None else z.new_zeros(len(w1), self.rank)  # [M, R]
        return self.mlp(torch.cat([z, hz], dim=-1))                            # [M, C]


class ProbeData:
    """Token classes and the train / validation / test split (by chunk: seq_id) shared by all probes."""

    def __init__(self, w1: np.ndarray, w2: np.ndarray, seq_id: np.ndarray, cfg: ProbeConfig):
        rng = np.random.default_rng(cfg.seed)
        seqs = rng.permutation(np.unique(seq_id))
        n_test = max(1, int(round(cfg.test_frac * len(seqs))))
        n_val = max(1, int(round(cfg.val_frac * len(seqs))))
        if len(seqs) < 3:
            raise UserError("the probe needs at least 3 chunks (train, validation, test): give more text")
        split = np.zeros(len(w1), np.int64)                                   # 0 train, 1 val, 2 test
        split[np.isin(seq_id, seqs[:n_test])] = 2
        split[np.isin(seq_id, seqs[n_test: n_test + n_val])] = 1
        self.split, self.seq_id = split, seq_id
        self.x, self.n_in = self._classes(w1, split == 0, cfg.min_count)
        self.y, self.n_out = self._classes(w2, split == 0, cfg.min_count)

    @staticmethod
    def _classes(tokens: np.ndarray, train: np.ndarray, min_count: int) -> tuple[torch.Tensor, int]:
        vocab, counts = np.unique(tokens[train], return_counts=True)
        kept = vocab[counts >= min_count]
        idx = np.searchsorted(kept, tokens)
        found = (idx < len(kept)) & (kept[np.minimum(idx, len(kept) - 1)] == tokens)
        return torch.from_numpy(np.where(found, idx, len(kept))), len(kept) + 1   # last class: "other"


def _token_ce(model: _Probe, data: ProbeData, h: torch.Tensor | None, mask: np.ndarray) -> torch.Tensor:
    idx = torch.from_numpy(np.flatnonzero(mask))
    with torch.no_grad():
        logits = model(data.x[idx], None if h is None else h[idx])
        return nn.functional.cross_entropy(logits, data.y[idx], reduction="none")   # [M_split]


def train_probe(data: ProbeData, h: torch.Tensor | None, cfg: ProbeConfig) -> torch.Tensor:
    """Trains one probe (with h [M, H] or without: None); returns the per-token test CE (nats)."""
    torch.manual_seed(cfg.seed)
    model = _Probe(data.n_in, data.n_out, 0 if h is None else h.shape[1], cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train = torch.from_numpy(np.flatnonzero(data.split == 0))
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, stale = math.inf, None, 0
    for _ in range(cfg.epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=gen)].split(cfg.batch):
            logits = model(data.x[batch], None if h is None else h[batch])
            loss = nn.functional.cross_entropy(logits, data.y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        val = float(_token_ce(model, data, h, data.split == 1).mean())
        if val < best - 1e-4:
            best, best_state, stale = val, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return _token_ce(model, data, h, data.split == 2)


def paired_ci(ce_without: torch.Tensor, ce_with: torch.Tensor, clusters: np.ndarray, reps: int = 2000,
              seed: int = 0) -> tuple[float, float, float]:
    """Mean of ce_without - ce_with with a 95% bootstrap interval over clusters (test chunks)."""
    diff = (ce_without - ce_with).double().numpy()
    ids, inv = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inv, weights=diff, minlength=len(ids))
    counts = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    est = float(diff.mean())
    if len(ids) < 2:
        return est, math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(reps, len(ids)))
    boot = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return est, float(lo), float(hi)


def estimate(hidden: dict[int, torch.Tensor], w1: np.ndarray, w2: np.ndarray, seq_id: np.ndarray,
             cfg: ProbeConfig) -> list[dict]:
    """One row per layer: held-out CE without / with h_t and their difference (nats / token)."""
    data = ProbeData(w1, w2, seq_id, cfg)
    test_clusters = seq_id[data.split == 2]
    ce_without = train_probe(data, None, cfg)
    rows = []
    for layer in sorted(hidden):
        h = hidden[layer].float()
        ce_with = train_probe(data, h, cfg)
        est, lo, hi = paired_ci(ce_without, ce_with, test_clusters, seed=cfg.seed)
        rows.append({"layer": layer, "train_tokens": int((data.split == 0).sum()),
                     "test_tokens": int((data.split == 2).sum()), "classes": data.n_out,
                     "other_share": float((data.y[torch.from_numpy(data.split == 2)] == data.n_out - 1).float().mean()),
                     "ce_without_h": float(ce_without.mean()), "ce_with_h": float(ce_with.mean()),
                     "cmi": est, "cmi_lo": lo, "cmi_hi": hi})
    return rows


# ------------------------------------------------------------------ collecting hidden states
def _load_target(name: str):
    from harness.targets import load_target

    return load_target(name, backend="native", device="cpu", dtype=torch.float32)


def default_layers(num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({round(i * (num_layers - 1) / 4) for i in range(5)}))


def collect(target, sequences: list[list[int]], cfg: CollectConfig):
    """Runs chunks of ctx tokens of the sequences through the target, each chunk from a fresh cache;
    returns hidden {layer: [M, H]}, w1, w2 and the chunk of each position [M] (the unit of the split)."""
    T = cfg.ctx
    chunks = [seq[start: start + T] for seq in sequences for start in range(0, len(seq) - T + 1, T)]
    chunks = chunks[: max(1, cfg.max_tokens // T)]
    if len(chunks) < 3:
        raise UserError(f"need at least 3 chunks of {T} tokens for the probe: give more text or a smaller --ctx")
    layers = cfg.layers or default_layers(target.num_layers)
    bad = [l for l in layers if not 0 <= l < target.num_layers]
    if bad:
        raise UserError(f"--layers {bad} out of range: the target has layers 0..{target.num_layers - 1}")
    hidden: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    ids = torch.tensor(chunks, dtype=torch.long)                               # [C, T]
    with torch.inference_mode():
        for batch in ids.split(cfg.batch):
            target.reset(batch_size=batch.shape[0])
            out = target.forward(batch, positions=None, hidden_layers=tuple(layers))
            for l in layers:
                hidden[l].append(out.hidden[l][:, : T - 2].reshape(-1, out.hidden[l].shape[-1]).float().cpu())
    w1 = ids[:, 1: T - 1].reshape(-1).numpy()
    w2 = ids[:, 2:].reshape(-1).numpy()
    seq_id = np.repeat(np.arange(len(chunks)), T - 2)
    return {l: torch.cat(v) for l, v in hidden.items()}, w1, w2, seq_id


def _read_sequences(args, tokenizer) -> list[list[int]]:
    if args.ids:
        from harness.meter.ngram_base import read_id_sequences

        return read_id_sequences(args.ids)
    path = Path(args.text)
    if not path.exists():
        raise UserError(f"text file {path} not found")
    return [tokenizer.encode(path.read_text(encoding="utf-8"))]


# ------------------------------------------------------------------ output
def write_outputs(rows: list[dict], out_dir: Path, title: str, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "probe.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"## Probe: I(H_t; W_t+2 | W_t+1) by layer, {title}", "",
             "Our estimator (arXiv 2507.19247 §4.1 defines the quantity, not this): held-out cross-entropy of a"
             " probe q(w_t+2 | w_t+1) minus that of the matched probe q(w_t+2 | h_t, w_t+1); nats / token,"
             " [95% bootstrap over test chunks]. Predictive V-information of the probe family on a coarsened"
             " vocabulary (rare tokens share one class).", "",
             "| layer | train tokens | test tokens | classes | test share of 'other' | CE without h | CE with h |"
             " estimate [95%] |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['train_tokens']} | {r['test_tokens']} | {r['classes']} | "
                     f"{r['other_share']:.2f} | {r['ce_without_h']:.3f} | {r['ce_with_h']:.3f} | "
                     f"{r['cmi']:.3f} [{r['cmi_lo']:.3f}, {r['cmi_hi']:.3f}] |")
    (out_dir / "probe.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / "probe_config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["layer"] for r in rows]
    y = np.array([r["cmi"] for r in rows])
    err = np.array([[r["cmi"] - r["cmi_lo"] for r in rows], [r["cmi_hi"] - r["cmi"] for r in rows]])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer of h_t (0-based decoder layer output)")
    ax.set_ylabel("CE(w_t+2 | w_t+1) - CE(w_t+2 | h_t, w_t+1)\n(nats / token)")
    ax.set_title(f"Information in h_t about the token after next, {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "probe.png", dpi=120)
    plt.close(fig)


def _cmd_probe(args) -> int:
    if not args.ids and not args.text:
        raise UserError("give the text to probe on: --ids FILE.jsonl (target-generated ids, e.g. a run's "
                        "prompts.jsonl) or --text FILE.txt")
    cfg = PRESETS[args.preset]
    if args.seed is not None:
        cfg = ProbeConfig(**{**asdict(cfg), "seed": args.seed})
    coll = CollectConfig(max_tokens=args.max_tokens, ctx=args.ctx, batch=args.batch,
                         layers=tuple(args.layers or ()))
    check_out_dir(Path(args.out or f"results/probe-{Path(args.target).name}"))
    target = _load_target(args.target)
    seqs = _read_sequences(args, target.tokenizer)
    hidden, w1, w2, seq_id = collect(target, seqs, coll)
    rows = estimate(hidden, w1, w2, seq_id, cfg)
    name = Path(args.target).name
    out = Path(args.out or f"results/probe-{name}")
    write_outputs(rows, out, name, {"target": args.target, "probe": asdict(cfg), "collect": asdict(coll),
                                    "source": args.ids or args.text})
    print((out / "probe.md").read_text(encoding="utf-8"), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser("probe", help="probe the target's hidden states for I(H_t; W_t+2 | W_t+1) by layer")
    p.add_argument("--target", required=True, help="model name (e.g. smollm2-135m) or path")
    p.add_argument("--layers", type=int, nargs="+", help="0-based decoder layers (default: five spread over the depth)")
    p.add_argument("--ids", help="JSONL of target-generated token ids (key 'ids', or a run's prompts.jsonl)")
    p.add_argument("--text", help="a plain text file instead")
    p.add_argument("--max-tokens", type=int, default=CollectConfig.max_tokens, help="tokens run through the target")
    p.add_argument("--ctx", type=int, default=CollectConfig.ctx, help="tokens per chunk")
    p.add_argument("--batch", type=int, default=CollectConfig.batch, help="chunks per forward")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="probe size and training")
    p.add_argument("--seed", type=int, help="seed for the split and the probes")
    p.add_argument("--out", help="output folder (default results/probe-<target>)")
    p.set_defaults(func=_cmd_probe)
