"""Figures for `spec-harness report`, each saved as PNG with the data behind it as CSV (same basename).

Every figure is FIGSIZE at DPI (1000 x 450 pixels), has a title, axis labels with units and a caption
naming the run(s), device and target. The functions take the summary table (harness.reports.summary) with a
`series` column (the label of one line or bar set: drafter, plus run and batch size when several)
and return the Figure records they wrote, or None when the run has nothing to show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harness.reports.summary import ALL, PHASES, acceptance_columns  # noqa: E402

FIGSIZE = (10.0, 4.5)  # inches
DPI = 100              # -> 1000 x 450 pixels
MAX_BINS = 10
PHASE_LABELS = {"t_draft": "draft", "t_verify": "verify", "t_accept": "accept", "t_other": "other"}


@dataclass
class Figure:
    png: Path
    csv: Path
    title: str
    caption: str


def _figure(ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=FIGSIZE, dpi=DPI, layout="constrained", squeeze=False)
    fig.get_layout_engine().set(rect=(0.0, 0.06, 1.0, 0.94))  # room for the caption below
    return fig, list(axes[0])


def _save(fig, data: pd.DataFrame, out_dir: Path, name: str, title: str, caption: str) -> Figure:
    fig.suptitle(title)
    fig.text(0.5, 0.012, caption, ha="center", va="bottom", fontsize=8, color="0.3")
    png, csv = Path(out_dir) / f"{name}.png", Path(out_dir) / f"{name}.csv"
    fig.savefig(png, dpi=DPI)
    plt.close(fig)
    data.to_csv(csv, index=False)
    return Figure(png, csv, title, caption)


def _errors(values, lo, hi) -> np.ndarray:
    """[2, n] error-bar lengths; 0 where an interval is missing."""
    values, lo, hi = (np.asarray(x, dtype=float) for x in (values, lo, hi))
    err = np.stack([values - lo, hi - values])
    return np.where(np.isfinite(err), np.maximum(err, 0.0), 0.0)


def acceptance_by_position(df: pd.DataFrame, out_dir: Path, caption: str) -> Figure | None:
    uncond, cond = acceptance_columns(df, "uncond"), acceptance_columns(df, "cond")
    rows = df[(df["category"] == ALL)]
    records = []
    for r in rows.to_dict("records"):
        if not uncond or not any(math.isfinite(r[c]) for c in uncond):
            continue  # ar, or a drafter that never drafted
        for j, (cu, cc) in enumerate(zip(uncond, cond), start=1):
            records.append({"series": r["series"], "position": j, "conditional": r[cc], "unconditional": r[cu]})
    if not records:
        return None
    data = pd.DataFrame(records)
    fig, (ax_c, ax_u) = _figure(2)
    for ax, col, label in ((ax_c, "conditional", "conditional (all earlier drafts accepted)"),
                           (ax_u, "unconditional", "unconditional (all steps that drafted j)")):
        for series, g in data.groupby("series", sort=False):
            ax.plot(g["position"], g[col], marker="o", label=series)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("draft position j (1-based)")
        ax.set_ylabel("acceptance rate (fraction of steps)")
        ax.set_ylim(0, 1.05)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    ax_u.legend(fontsize=8)
    return _save(fig, data, out_dir, "acceptance_by_position", "Acceptance by draft position", caption)


def tau_speedup_by_category(df: pd.DataFrame, out_dir: Path, caption: str) -> Figure | None:
    cols = ["series", "category", "tau", "tau_lo", "tau_hi", "speedup", "speedup_lo", "speedup_hi"]
    data = df[cols].reset_index(drop=True)
    if data.empty:
        return None
    cats = list(dict.fromkeys([c for c in data["category"] if c != ALL] + [ALL]))
    series = list(dict.fromkeys(data["series"]))
    width = 0.8 / len(series)
    fig, (ax_t, ax_s) = _figure(2)
    x = np.arange(len(cats))
    for i, s in enumerate(series):
        g = data[data["series"] == s].set_index("category").reindex(cats)
        for ax, m in ((ax_t, "tau"), (ax_s, "speedup")):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, g[m].fillna(0.0), width, label=s,
                   yerr=_errors(g[m], g[m + "_lo"], g[m + "_hi"]), capsize=2)
    for ax, ylabel, title in ((ax_t, "tau (tokens per target forward)", "tau"),
                              (ax_s, "speedup vs ar (x, tok/s ratio)", "speedup vs ar (95% CI)")):
        ax.set_xticks(x, cats, rotation=30 if len(cats) > 4 else 0, fontsize=8)
        ax.set_xlabel("category")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    ax_s.axhline(1.0, color="0.4", lw=0.8, ls="--")
    ax_t.legend(fontsize=8)
    return _save(fig, data, out_dir, "tau_speedup_by_category", "tau and speedup per category", caption)


def time_split(df: pd.DataFrame, out_dir: Path, caption: str) -> Figure | None:
    rows = df[(df["category"] == ALL) & np.isfinite(df["t_step_ms"].astype(float))]
    if rows.empty:
        return None
    data = pd.DataFrame({"series": rows["series"].to_numpy()})
    for p in PHASES:
        data[f"{PHASE_LABELS[p]}_ms"] = (rows[p] * rows["t_step_ms"]).to_numpy()
    data["step_ms"] = rows["t_step_ms"].to_numpy()
    fig, (ax,) = _figure(1)
    bottom = np.zeros(len(data))
    x = np.arange(len(data))
    for p in PHASES:
        v = data[f"{PHASE_LABELS[p]}_ms"].fillna(0.0).to_numpy()
        ax.bar(x, v, 0.6, bottom=bottom, label=PHASE_LABELS[p])
        bottom += v
    ax.set_xticks(x, data["series"], fontsize=8)
    ax.set_xlabel("drafter")
    ax.set_ylabel("time per step (ms)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, data, out_dir, "time_split", "Time per step: draft / verify / accept / other", caption)


def tok_s_vs_batch(df: pd.DataFrame, out_dir: Path, caption: str) -> Figure | None:
    rows = df[df["category"] == ALL]
    if rows["batch_size"].nunique() < 2:
        return None
    data = rows[["line", "batch_size", "tok_s", "tok_s_lo", "tok_s_hi"]].rename(columns={"line": "series"})
    data = data.sort_values(["series", "batch_size"], kind="stable").reset_index(drop=True)
    fig, (ax,) = _figure(1)
    for s, g in data.groupby("series", sort=False):
        ax.errorbar(g["batch_size"], g["tok_s"], yerr=_errors(g["tok_s"], g["tok_s_lo"], g["tok_s_hi"]),
                    marker="o", capsize=3, label=s)
    ax.set_xscale("log", base=2)
    sizes = sorted(data["batch_size"].unique())
    ax.set_xticks(sizes, [str(int(b)) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("tok/s per sequence (new tokens / wall s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, data, out_dir, "tok_s_vs_batch", "tok/s against batch size (95% CI)", caption)


def surplus_bins(surplus: np.ndarray, accepted: np.ndarray, depth: np.ndarray) -> pd.DataFrame:
    """Steps binned by their surplus_use (sum over committed depth): one bin per distinct value when
    there are at most MAX_BINS of them, else MAX_BINS quantile bins. Per bin: mean surplus, mean
    accepted drafts per step, accept rate (accepted / drafted depth) and the number of steps."""
    keep = np.isfinite(surplus)
    surplus, accepted, depth = surplus[keep], accepted[keep], depth[keep]
    distinct = np.unique(surplus)
    if len(distinct) <= MAX_BINS:
        which = np.searchsorted(distinct, surplus)
    else:
        edges = np.unique(np.quantile(surplus, np.linspace(0, 1, MAX_BINS + 1))[1:-1])
        which = np.searchsorted(edges, surplus, side="right")
    out = []
    for b in np.unique(which):
        m = which == b
        out.append({"bin": int(b), "surplus_use": surplus[m].mean(), "accepted_per_step": accepted[m].mean(),
                    "accept_rate": accepted[m].sum() / depth[m].sum() if depth[m].sum() else math.nan,
                    "steps": int(m.sum())})
    return pd.DataFrame(out)


def surplus_vs_acceptance(steps: pd.DataFrame, out_dir: Path, caption: str) -> Figure | None:
    """steps: one row per step with series, surplus_use (per-step sum, nats), accepted, depth."""
    if steps.empty or not np.isfinite(steps["surplus_use"].to_numpy(float)).any():
        return None
    parts = []
    for s, g in steps.groupby("series", sort=False):
        b = surplus_bins(g["surplus_use"].to_numpy(float), g["accepted"].to_numpy(float), g["depth"].to_numpy(float))
        if not b.empty:
            parts.append(b.assign(series=s))
    data = pd.concat(parts, ignore_index=True)[["series", "bin", "surplus_use", "accepted_per_step",
                                                 "accept_rate", "steps"]]
    fig, (ax,) = _figure(1)
    for s, g in data.groupby("series", sort=False):
        ax.plot(g["surplus_use"], g["accepted_per_step"], marker="o", label=s)
    ax.set_xlabel("surplus_use per step (nats, summed over committed depth)")
    ax.set_ylabel("accepted drafts per step (tokens)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, data, out_dir, "surplus_vs_acceptance", "Information surplus used against acceptance",
                 caption)
