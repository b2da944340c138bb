"""Summary tables derived from a run folder's raw records (steps.jsonl, prompts.jsonl) only.

One row per drafter x suite x category x batch size, plus category "all" per drafter and batch size.
Vocabulary as in `harness`: accepted, emitted, tau, acceptance by position. Every count is of what was
emitted: a step cut at EOS or --max-new-tokens counts only its kept tokens (harness.records), so
tau = mean_accepted + the share of steps that emitted a bonus or recovered token (all but cut steps).

Columns (summary.csv):
  drafter, suite, category, batch_size
  prompts, new_tokens, wall_s     finished prompts and their sums (prompts.jsonl)
  tok_s                           sum new_tokens / sum wall_s (per sequence when batched)
  steps                           target forwards (step records)
  tau                             sum emitted / steps: tokens per target forward, bonus included
  mean_accepted                   sum accepted / steps: accepted drafts per step, bonus excluded
  accept_rate                     sum accepted / sum drafted (NaN when nothing was drafted)
  speedup                         tok_s / tok_s of "ar", both over the prompts the two share
                                  (same suite, prompt, batch size); NaN without ar
  paired_prompts                  how many prompts that speedup is computed over
  diverged                        share of prompts whose output differs from ar's (NaN for ar)
  diverged_wide                   share of prompts whose first divergence from ar came where the target's
                                  top-1 minus top-2 logit margin exceeded WIDE_MARGIN
                                  (harness.engine.divergence; NaN when not measured, e.g. at T > 0).
                                  A correct verifier keeps it 0 in fp32 and bf16
  failed                          prompts that failed (listed in summary.md with their reasons)
  t_draft, t_verify, t_accept, t_other   share of step time spent in each phase
  t_step_ms                       mean time per step (ms)
  *_lo, *_hi                      95% bootstrap interval over prompts for tok_s, tau and speedup
                                  (1000 resamples, fixed seed; speedup resamples the paired prompts
                                  once for both the drafter and ar)
  acc_uncond_j, acc_cond_j        acceptance at draft position j = 1..Kmax (Kmax = deepest draft
                                  in the run; `depth` is used, so trees count their longest path):
                                    unconditional_j = #steps accepted >= j / #steps depth >= j
                                    conditional_j   = #steps accepted >= j
                                                      / #steps depth >= j and accepted >= j - 1
  meter columns, when the steps carry them (lists over committed depth):
    surplus_ub, surplus_use       mean over steps of the per-step sum over depths j >= 2 (nats per step)
    kl, alpha_theory, h_verify, h_draft   mean over all committed positions (pooled over steps)

An interrupted and resumed run may hold the step records of an unfinished attempt at a prompt: only
prompts present in prompts.jsonl count, and for each prompt only the steps of its last attempt
(the records after the last point where (turn, step) stops increasing).
"""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from harness.errors import UserError
from harness.records import BATCH_RUNS, read_jsonl

BASELINE = "ar"
ALL = "all"
N_BOOT = 1000
SEED = 0
PHASES = ("t_draft", "t_verify", "t_accept", "t_other")
METER_SUMS = ("surplus_ub", "surplus_use")  # per step: sum over committed depths j >= 2
METER_MEANS = ("kl", "alpha_theory", "h_verify", "h_draft")  # pooled mean over committed positions
KEY = ("drafter", "suite", "pid", "batch_size")

DEFINITIONS = (
    "Definitions: tau = tokens emitted per target forward (bonus or recovered token included); "
    "accepted/step = accepted drafts per step (bonus excluded); accept rate = accepted / drafted; "
    "speedup = tok/s / tok/s of ar on the same prompts; diverged = share of prompts whose output "
    "differs from ar's; diverged at a wide margin = share whose first difference came where ar's top-1 "
    "minus top-2 logit exceeded 1.0 (a bug, not numerics); counts are of emitted tokens (a step cut at EOS "
    "or the token limit counts its kept tokens only); acceptance at position j: unconditional = #steps accepted >= j / #steps "
    "drafted >= j, conditional = #steps accepted >= j / #steps drafted >= j and accepted >= j-1; "
    "[95% CI] = bootstrap over prompts (1000 resamples, paired with ar for speedup)."
)


# ----------------------------------------------------------------------------- loading records

def load_records(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns (prompts, steps) of finished prompts: one row per (drafter, suite, prompt, batch size)
    and that prompt's steps from its last attempt. Both carry the key columns `KEY` (pid = prompt_id
    as text); steps also carry `row`, the index of its prompt in the prompts frame."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run folder; pass a results/<run> directory")
    prompt_recs = [r for r in read_jsonl(run_dir / "prompts.jsonl") if not r.get("failed")]
    if not prompt_recs:
        raise UserError(f"no finished prompts in {run_dir / 'prompts.jsonl'}; run `spec-harness run` "
                        "first, or check the folder")
    steps = _steps_frame(list(read_jsonl(run_dir / "steps.jsonl")))
    prompts = _prompts_frame(prompt_recs, steps)
    wide = {(r["drafter"], str(r["prompt_id"])): float(bool(r.get("wide")))
            for r in read_jsonl(run_dir / "divergence.jsonl")}
    prompts["diverged_wide"] = [
        0.0 if d == 0.0 else (wide.get((dr, pid), math.nan) if d == 1.0 else math.nan)
        for dr, pid, d in zip(prompts["drafter"], prompts["pid"], prompts["diverged"])]
    key = list(KEY)
    index = pd.MultiIndex.from_frame(prompts[key])
    steps = steps.assign(row=index.get_indexer(pd.MultiIndex.from_frame(steps[key])) if len(steps) else [])
    steps = steps[steps["row"] >= 0].reset_index(drop=True)
    steps = _last_attempt(steps)
    return prompts, steps


def _steps_frame(recs: list[dict]) -> pd.DataFrame:
    cols = ["drafter", "suite", "prompt_id", "turn", "step", "batch_size", "drafted", "depth",
            "accepted", "emitted", *PHASES]
    df = pd.DataFrame(recs) if recs else pd.DataFrame(columns=cols)
    for col in cols:
        if col not in df:
            df[col] = np.nan
    df["suite"] = df["suite"].fillna("").astype(str)
    df["pid"] = df["prompt_id"].astype(str)
    df["batch_size"] = pd.to_numeric(df["batch_size"]).fillna(1).astype(int)
    for col in ("turn", "step", "drafted", "accepted"):
        df[col] = pd.to_numeric(df[col]).fillna(0).astype(int)
    df["depth"] = pd.to_numeric(df["depth"]).fillna(df["drafted"]).astype(int)
    df["emitted"] = pd.to_numeric(df["emitted"]).fillna(df["accepted"] + 1).astype(int)
    for col in PHASES:
        df[col] = pd.to_numeric(df[col]).fillna(0.0).astype(float)
    return df


def _prompts_frame(recs: list[dict], steps: pd.DataFrame) -> pd.DataFrame:
    df = pd.DataFrame(recs)
    for col in ("drafter", "prompt_id", "new_tokens", "wall_s"):
        if col not in df:
            raise UserError(f"prompts.jsonl records lack `{col}`; the run folder was not written by "
                            "this harness version (rerun it)")
    for col, default in (("suite", ""), ("category", "none")):
        df[col] = df[col].fillna(default).astype(str) if col in df else default
    df["pid"] = df["prompt_id"].astype(str)
    df["new_tokens"] = pd.to_numeric(df["new_tokens"]).fillna(0).astype(float)
    df["wall_s"] = pd.to_numeric(df["wall_s"]).fillna(0.0).astype(float)
    if "diverged" in df:
        df["diverged"] = df["diverged"].map(lambda v: np.nan if v is None or v != v else float(bool(v)))
    else:
        df["diverged"] = np.nan
    if "batch_size" in df:
        df["batch_size"] = pd.to_numeric(df["batch_size"])
    else:
        df["batch_size"] = np.nan
    missing = df["batch_size"].isna()
    if missing.any():
        df.loc[missing, "batch_size"] = _batch_sizes_from_steps(df[missing], steps)
    df["batch_size"] = df["batch_size"].astype(int)
    # A prompt finished twice (a rerun without --resume): the last record wins.
    df = df.drop_duplicates(subset=list(KEY), keep="last").reset_index(drop=True)
    return df


def _batch_sizes_from_steps(prompts: pd.DataFrame, steps: pd.DataFrame) -> list[int]:
    """For prompts records without batch_size: the k-th record of a prompt gets the k-th batch size
    its steps show (in order of first appearance), or 1 when there are no steps."""
    seen: dict[tuple, list[int]] = {}
    for d, s, p, b in steps[["drafter", "suite", "pid", "batch_size"]].drop_duplicates().itertuples(index=False):
        seen.setdefault((d, s, p), []).append(int(b))
    count: dict[tuple, int] = {}
    out = []
    for d, s, p in prompts[["drafter", "suite", "pid"]].itertuples(index=False):
        sizes = seen.get((d, s, p), [1])
        k = count.get((d, s, p), 0)
        count[(d, s, p)] = k + 1
        out.append(sizes[min(k, len(sizes) - 1)])
    return out


def _last_attempt(steps: pd.DataFrame) -> pd.DataFrame:
    if steps.empty:
        return steps
    order = steps["turn"].to_numpy(np.int64) * (1 << 32) + steps["step"].to_numpy(np.int64)
    s = steps.assign(_order=order, _file=np.arange(len(steps))).sort_values(["row", "_file"], kind="stable")
    restart = (s["row"].eq(s["row"].shift())) & (s["_order"] <= s["_order"].shift())
    attempt = restart.astype(int).groupby(s["row"]).cumsum()
    keep = attempt.eq(attempt.groupby(s["row"]).transform("max"))
    return s[keep].sort_values("_file").drop(columns=["_order", "_file"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- per prompt sums

def _meter_fields(recs_steps: pd.DataFrame) -> list[str]:
    return [f for f in (*METER_SUMS, *METER_MEANS) if f in recs_steps and recs_steps[f].notna().any()]


def list_stats(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per step: (sum over committed depth, count of finite entries) of a list-valued meter field
    (a bare number counts as a one-entry list; None and NaN entries are skipped)."""
    n = len(values)
    present = np.flatnonzero(values.notna().to_numpy())  # steps without the field hold NaN
    lists = [v if isinstance(v, (list, tuple)) else [v] if isinstance(v, (int, float)) else []
             for v in values.to_numpy()[present]]
    lens = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
    flat = np.array(list(chain.from_iterable(lists)), dtype=float)  # None -> NaN
    owner = np.repeat(present, lens)
    fin = np.isfinite(flat)
    sums = np.bincount(owner[fin], weights=flat[fin], minlength=n).astype(float)
    counts = np.bincount(owner[fin], minlength=n).astype(float)
    return sums, counts


def per_prompt(prompts: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """The prompts frame plus per-prompt sums of its steps: steps, emitted, accepted, drafted, the
    phase times, and for meter fields `<f>_sum` / `<f>_n` (see module docstring)."""
    out = prompts.copy()
    n = len(out)
    rows = steps["row"].to_numpy(np.int64)

    def add(values) -> np.ndarray:
        return np.bincount(rows, weights=np.asarray(values, dtype=float), minlength=n)

    out["steps"] = np.bincount(rows, minlength=n).astype(float)
    for col in ("emitted", "accepted", "drafted", *PHASES):
        out[col] = add(steps[col])
    for f in _meter_fields(steps):
        values = steps[f]
        if f in METER_SUMS:  # the surplus is the sum over depths j >= 2 (depth 1 bounds I(H_t; W_t))
            values = values.map(lambda v: v[1:] if isinstance(v, (list, tuple)) else v)
        sums, counts = list_stats(values)
        if f in METER_SUMS:
            out[f + "_sum"] = add(sums)
            out[f + "_n"] = add(counts > 0)
        else:
            out[f + "_sum"] = add(sums)
            out[f + "_n"] = add(counts)
    return out


# ----------------------------------------------------------------------------- bootstrap

def bootstrap_ci(columns: Sequence[np.ndarray], statistic: Callable[..., np.ndarray],
                 n_boot: int = N_BOOT, seed: int = SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `statistic(*sums)` where sums are the column sums over prompts
    resampled with replacement (the same resample for every column, so ratios stay paired).
    Vectorised: one [n_boot, n] index matrix. NaN for fewer than two prompts."""
    n = len(columns[0]) if columns else 0
    if n < 2:  # one prompt says nothing about the spread over prompts
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # [n_boot, n]
    sums = [np.asarray(c, dtype=float)[idx].sum(axis=1) for c in columns]  # each [n_boot]
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = np.asarray(statistic(*sums), dtype=float)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a / b


def _speedup(nd: np.ndarray, wd: np.ndarray, na: np.ndarray, wa: np.ndarray) -> np.ndarray:
    return (nd / wd) / (na / wa)


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


# ----------------------------------------------------------------------------- acceptance

def acceptance_by_position(accepted: np.ndarray, depth: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(unconditional [kmax], conditional [kmax]) acceptance at positions j = 1..kmax; NaN where no
    step qualifies. A step counts toward position j's conditional denominator when it drafted j or
    more tokens and accepted j-1 or more, i.e. when min(depth, accepted + 1) >= j."""

    def at_least(values: np.ndarray) -> np.ndarray:  # [kmax]: #values >= j for j = 1..kmax
        counts = np.bincount(np.clip(values, 0, kmax), minlength=kmax + 1)
        return counts[::-1].cumsum()[::-1][1:].astype(float)

    accepted = np.asarray(accepted, dtype=np.int64)
    depth = np.asarray(depth, dtype=np.int64)
    hit = at_least(np.minimum(accepted, depth))
    with np.errstate(divide="ignore", invalid="ignore"):
        uncond = hit / at_least(depth)
        cond = hit / at_least(np.minimum(depth, accepted + 1))
    return uncond, cond


# ----------------------------------------------------------------------------- the summary

def summarize(run_dir: Path) -> pd.DataFrame:
    """The summary table of a run folder (see the module docstring for every column)."""
    prompts, steps = load_records(run_dir)
    return summarize_records(prompts, steps)


def summarize_records(prompts: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    table = per_prompt(prompts, steps)
    kmax = int(steps["depth"].max()) if len(steps) else 0
    meters = _meter_fields(steps)
    step_rows = steps["row"].to_numpy(np.int64)
    acc = steps["accepted"].to_numpy(np.int64)
    dep = steps["depth"].to_numpy(np.int64)

    # Pair every prompt with ar's run of the same prompt at the same batch size.
    ar = table[table["drafter"] == BASELINE]
    ar_index = pd.MultiIndex.from_frame(ar[["suite", "pid", "batch_size"]])
    pos = ar_index.get_indexer(pd.MultiIndex.from_frame(table[["suite", "pid", "batch_size"]]))
    ar_row = np.where(pos >= 0, ar.index.to_numpy()[np.maximum(pos, 0)] if len(ar) else -1, -1)

    drafters = list(dict.fromkeys(table["drafter"]))
    drafters.sort(key=lambda d: d != BASELINE)  # ar first, then in order of appearance
    rows = []
    for drafter in drafters:
        for bs in sorted(table.loc[table["drafter"] == drafter, "batch_size"].unique()):
            mine = table[(table["drafter"] == drafter) & (table["batch_size"] == bs)]
            cats = mine[["suite", "category"]].drop_duplicates().sort_values(["suite", "category"])
            groups = [(s, c, mine[(mine["suite"] == s) & (mine["category"] == c)])
                      for s, c in cats.itertuples(index=False)]
            groups.append(("+".join(sorted(mine["suite"].unique())), ALL, mine))
            for suite, category, g in groups:
                row = {"drafter": drafter, "suite": suite, "category": category, "batch_size": int(bs)}
                row.update(_group_metrics(g, table, ar_row, drafter == BASELINE))
                in_group = np.isin(step_rows, g.index.to_numpy())
                if kmax:
                    uncond, cond = acceptance_by_position(acc[in_group], dep[in_group], kmax)
                    row.update({f"acc_uncond_{j + 1}": uncond[j] for j in range(kmax)})
                    row.update({f"acc_cond_{j + 1}": cond[j] for j in range(kmax)})
                for f in meters:
                    row[f] = _div(g[f + "_sum"].sum(), g[f + "_n"].sum())
                rows.append(row)
    return pd.DataFrame(rows)


def _group_metrics(g: pd.DataFrame, table: pd.DataFrame, ar_row: np.ndarray, is_ar: bool) -> dict:
    nt, wall = g["new_tokens"].to_numpy(float), g["wall_s"].to_numpy(float)
    emitted, nsteps = g["emitted"].to_numpy(float), g["steps"].to_numpy(float)
    step_time = sum(g[p].sum() for p in PHASES)
    m = {
        "prompts": len(g),
        "new_tokens": int(nt.sum()),
        "wall_s": wall.sum(),
        "tok_s": _div(nt.sum(), wall.sum()),
        "steps": int(nsteps.sum()),
        "tau": _div(emitted.sum(), nsteps.sum()),
        "mean_accepted": _div(g["accepted"].sum(), nsteps.sum()),
        "accept_rate": _div(g["accepted"].sum(), g["drafted"].sum()),
    }
    m["tok_s_lo"], m["tok_s_hi"] = bootstrap_ci([nt, wall], _ratio)
    m["tau_lo"], m["tau_hi"] = bootstrap_ci([emitted, nsteps], _ratio)
    paired = ar_row[g.index.to_numpy()]
    has = paired >= 0
    m["paired_prompts"] = int(has.sum())
    m["speedup"] = m["speedup_lo"] = m["speedup_hi"] = math.nan
    if has.any():
        cols = [nt[has], wall[has], table["new_tokens"].to_numpy(float)[paired[has]],
                table["wall_s"].to_numpy(float)[paired[has]]]
        with np.errstate(divide="ignore", invalid="ignore"):
            m["speedup"] = float(_speedup(*(c.sum() for c in cols)))
        m["speedup_lo"], m["speedup_hi"] = bootstrap_ci(cols, _speedup)
    div = g["diverged"].to_numpy(float)
    m["diverged"] = math.nan if is_ar or np.isnan(div).all() else float(np.nanmean(div))
    wide = g["diverged_wide"].to_numpy(float) if "diverged_wide" in g else np.full(len(g), np.nan)
    m["diverged_wide"] = math.nan if is_ar or np.isnan(wide).all() else float(np.nanmean(wide))
    for p in PHASES:
        m[p] = _div(g[p].sum(), step_time)
    m["t_step_ms"] = _div(step_time * 1000.0, nsteps.sum())
    return m


def write_summary(run_dir: Path) -> pd.DataFrame:
    """Writes summary.csv and summary.md into the run folder and returns the table."""
    run_dir = Path(run_dir)
    df = summarize(run_dir)
    df.to_csv(run_dir / "summary.csv", index=False)
    text = summary_markdown(df, title=f"Summary of {run_dir.name}")
    failed = failed_prompts(run_dir)
    if failed:
        text += "\n## Failed prompts\n\n" + markdown_table(
            ["drafter", "prompt", "reason"], [[f["drafter"], str(f["prompt_id"]), f["failed"]] for f in failed]) + \
            "\n\nRerun with `--resume` to retry them.\n"
    if (run_dir / "batch_runs.jsonl").is_file():
        text += "\n## Batches\n\n" + format_batch_summary(batch_summary(run_dir)) + "\n"
    selfspec = selfspec_note(run_dir)
    if selfspec:
        text += "\n## Self-speculation\n\n" + selfspec + "\n"
    (run_dir / "summary.md").write_text(text, encoding="utf-8")
    return df


def selfspec_note(run_dir: Path) -> str | None:
    """The skip set the run's selfspec drafter used (config.json), and how it was chosen; None without one."""
    import json

    path = run_dir / "config.json"
    info = json.loads(path.read_text()).get("extra", {}).get("selfspec") if path.is_file() else None
    if not info:
        return None
    skip = ",".join(map(str, info["skip"]))
    search = info.get("search") or {}
    if not search.get("table"):
        return f"selfspec skipped layers {skip} (given by --skip-layers)."
    chosen = next((r for r in search["table"] if r.get("chosen")), {})
    by = search.get("chosen_by", "predicted_tok_s").replace("_tok_s", " tok/s")
    nan = float("nan")
    return (f"selfspec skipped layers {skip} at K = {info.get('searched_k')}, chosen by the search on the calibration "
            f"prompts as the best {by} of {len(search['table'])} candidates (measured "
            f"{chosen.get('measured_tok_s', nan):.1f} tok/s, predicted {chosen.get('predicted_tok_s', nan):.1f}; "
            f"ar {search.get('ar_tok_s', nan):.1f} tok/s there).")


def failed_prompts(run_dir: Path) -> list[dict]:
    """The prompts that failed and were not retried successfully since: drafter, prompt_id, failed."""
    recs = list(read_jsonl(Path(run_dir) / "prompts.jsonl"))
    ok = {(r["drafter"], str(r["prompt_id"])) for r in recs if not r.get("failed")}
    last = {}
    for r in recs:
        if r.get("failed") and (r["drafter"], str(r["prompt_id"])) not in ok:
            last[(r["drafter"], str(r["prompt_id"]))] = r
    return list(last.values())


# ----------------------------------------------------------------------------- formatting

def _num(v, fmt: str) -> str:
    if v is None or not math.isfinite(float(v)):
        return "n/a"
    return format(float(v), fmt)


def _with_ci(row, col: str, fmt: str, suffix: str = "") -> str:
    v = row.get(col, math.nan)
    text = _num(v, fmt)
    if text == "n/a":
        return text
    lo, hi = row.get(col + "_lo", math.nan), row.get(col + "_hi", math.nan)
    if _num(lo, fmt) == "n/a" or _num(hi, fmt) == "n/a":
        return text + suffix
    return f"{text}{suffix} [{format(lo, fmt)}, {format(hi, fmt)}]"


def _tok_fmt(v) -> str:
    return ".0f" if isinstance(v, float) and math.isfinite(v) and v >= 1000 else ".1f"


def _pct(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table padded so it also reads as plain text in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _id_columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    cols = []
    if "run" in df and df["run"].nunique() > 1:
        cols.append(("run", "run"))
    cols.append(("drafter", "drafter"))
    if "batch_size" in df and df["batch_size"].dropna().nunique() > 1:
        cols.append(("batch_size", "batch"))
    if "suite" in df and df.loc[df["category"] != ALL, "suite"].nunique() > 1:
        cols.append(("suite", "suite"))
    cols.append(("category", "category"))
    return cols


def _id_cell(v) -> str:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:g}"
    return str(v)


def format_table(df: pd.DataFrame) -> str:
    """The main table (one line per summary row) as text, for summary.md and the terminal."""
    ids = _id_columns(df)
    headers = [label for _, label in ids] + [
        "prompts", "tok/s [95% CI]", "tau [95% CI]", "accepted/step", "accept rate",
        "speedup vs ar [95% CI]", "diverged from ar", "diverged at a wide margin"]
    rows = []
    for row in df.to_dict("records"):
        rows.append([_id_cell(row.get(c)) for c, _ in ids] + [
            _num(row.get("prompts", math.nan), ".0f"),
            _with_ci(row, "tok_s", _tok_fmt(row.get("tok_s"))),
            _with_ci(row, "tau", ".2f"),
            _num(row.get("mean_accepted", math.nan), ".2f"),
            _pct(row.get("accept_rate", math.nan)),
            _with_ci(row, "speedup", ".2f", "x"),
            _pct(row.get("diverged", math.nan)),
            _pct(row.get("diverged_wide", math.nan)),
        ])
    return markdown_table(headers, rows)


def acceptance_columns(df: pd.DataFrame, kind: str) -> list[str]:
    """acc_cond_1.. or acc_uncond_1.. in position order (kind: 'cond' or 'uncond')."""
    prefix = f"acc_{kind}_"
    cols = [c for c in df.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(prefix):]))


def format_acceptance(df: pd.DataFrame) -> str:
    """Acceptance by draft position for category "all", conditional and unconditional rows labelled."""
    uncond, cond = acceptance_columns(df, "uncond"), acceptance_columns(df, "cond")
    if not uncond:
        return "(no drafter proposed any tokens)"
    ids = [c for c in _id_columns(df) if c[0] not in ("category", "suite")]
    headers = [label for _, label in ids] + ["acceptance"] + [f"j={j}" for j in range(1, len(uncond) + 1)]
    rows = []
    for row in df[df["category"] == ALL].to_dict("records"):
        if not any(math.isfinite(row[c]) for c in uncond):
            continue
        for label, cols in (("conditional", cond), ("unconditional", uncond)):
            rows.append([_id_cell(row.get(c)) for c, _ in ids] + [label] +
                        [_num(row[c], ".3f") if math.isfinite(row[c]) else "" for c in cols])
    return markdown_table(headers, rows)


def format_time_split(df: pd.DataFrame) -> str:
    """Share of step time per phase and the mean step time, for category "all"."""
    ids = [c for c in _id_columns(df) if c[0] not in ("category", "suite")]
    headers = [label for _, label in ids] + ["ms/step", "draft", "verify", "accept", "other"]
    rows = []
    for row in df[df["category"] == ALL].to_dict("records"):
        if not math.isfinite(row.get("t_step_ms", math.nan)):
            continue
        rows.append([_id_cell(row.get(c)) for c, _ in ids] + [_num(row["t_step_ms"], ".2f")] +
                    [_pct(row[p]) for p in PHASES])
    return markdown_table(headers, rows)


def format_meters(df: pd.DataFrame) -> str | None:
    cols = [c for c in (*METER_SUMS, *METER_MEANS) if c in df]
    if not cols:
        return None
    ids = [c for c in _id_columns(df) if c[0] not in ("category", "suite")]
    labels = {"surplus_ub": "surplus_ub (nats/step)", "surplus_use": "surplus_use (nats/step)",
              "kl": "KL (nats/token)", "alpha_theory": "alpha_theory", "h_verify": "H verify (nats)",
              "h_draft": "H draft (nats)"}
    headers = [label for _, label in ids] + [labels[c] for c in cols]
    rows = [[_id_cell(r.get(c)) for c, _ in ids] + [_num(r[c], ".3f") for c in cols]
            for r in df[df["category"] == ALL].to_dict("records")]
    return markdown_table(headers, rows)


def summary_markdown(df: pd.DataFrame, title: str) -> str:
    parts = [f"# {title}", "", format_table(df), "",
             "## Acceptance by draft position (conditional and unconditional)", "",
             format_acceptance(df), "", "## Time per step (share of step time)", "", format_time_split(df)]
    meters = format_meters(df)
    if meters:
        parts += ["", "## Meter (information surplus)", "", meters,
                  "", "surplus: mean over steps of the sum over committed depths j >= 2; KL, alpha, H: mean "
                  "over committed positions."]
    parts += ["", DEFINITIONS, ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("summarize", help="rebuild summary.csv and summary.md from a run's records")
    p.add_argument("run_dir", type=Path, help="a results/<run> folder")
    p.set_defaults(func=_cmd_summarize)


def _cmd_summarize(args) -> int:
    df = write_summary(args.run_dir)
    print(format_table(df))
    return 0


# ----------------------------------------------------------------------------- batched runs

BATCH_COLUMNS = ("drafter", "batch_size", "k", "k_auto", "prompts", "new_tokens", "wall_s", "tok_s_total",
                   "tok_s_seq", "tau", "speedup_total", "speedup_seq", "predicted_tau", "predicted_speedup")


def batch_summary(run_dir: Path) -> pd.DataFrame:
    """One row per (drafter, batch size) from batch_runs.jsonl and the per prompt records:

    tok_s_total    all new tokens / wall time of the batched runs (attempts of a resumed run add up)
    tok_s_seq      per sequence: sum new_tokens / sum wall_s over prompts (join to leave)
    tau            tokens emitted per target forward (bonus included), from the step records
    speedup_total, speedup_seq   the same tok/s over ar's at the same batch size (NaN without ar)
    k, k_auto, predicted_tau, predicted_speedup   K of the last attempt and the cost model's
                   prediction for it (NaN without a calibration)
    A run without batch_runs.jsonl (the plain batch-1 loop) gets tok_s_total = tok_s_seq and k = NaN.
    """
    run_dir = Path(run_dir)
    table = per_prompt(*load_records(run_dir))
    runs = list(read_jsonl(run_dir / BATCH_RUNS))
    if not runs:  # a batch-1 run of the plain loop: its prompts ran one after another
        runs = [dict(drafter=d, batch_size=b, k=math.nan, k_auto=False, new_tokens=g["new_tokens"].sum(),
                     wall_s=g["wall_s"].sum()) for (d, b), g in table.groupby(["drafter", "batch_size"], sort=False)]
    rows = []
    for (drafter, bs), g in pd.DataFrame(runs).groupby(["drafter", "batch_size"], sort=False):
        last = g.iloc[-1]
        mine = table[(table["drafter"] == drafter) & (table["batch_size"] == bs)]
        rows.append(dict(
            drafter=drafter, batch_size=int(bs), k=_num_or_nan(last["k"]), k_auto=bool(last["k_auto"]),
            prompts=len(mine), new_tokens=int(mine["new_tokens"].sum()), wall_s=float(g["wall_s"].sum()),
            tok_s_total=_div(g["new_tokens"].sum(), g["wall_s"].sum()),
            tok_s_seq=_div(mine["new_tokens"].sum(), mine["wall_s"].sum()),
            tau=_div(mine["emitted"].sum(), mine["steps"].sum()),
            predicted_tau=_num_or_nan(last.get("predicted_tau")), predicted_speedup=_num_or_nan(last.get("predicted_speedup")),
        ))
    df = pd.DataFrame(rows)
    ar = df[df["drafter"] == "ar"].set_index("batch_size")
    for col, src in (("speedup_total", "tok_s_total"), ("speedup_seq", "tok_s_seq")):
        base = df["batch_size"].map(ar[src]) if len(ar) else math.nan
        df[col] = df[src] / base
    return df[list(BATCH_COLUMNS)]


def format_batch_summary(df: pd.DataFrame) -> str:
    """batch_summary as a table a person reads (summary.md can append it)."""
    def num(v, fmt):
        return "n/a" if v is None or not math.isfinite(float(v)) else format(float(v), fmt)

    headers = ["drafter", "batch", "K", "prompts", "tok/s total", "tok/s per seq", "tau", "speedup total",
               "speedup per seq", "predicted tau", "predicted speedup"]
    rows = [[r["drafter"], str(r["batch_size"]), num(r["k"], ".0f") + (" (auto)" if r["k_auto"] else ""), str(r["prompts"]),
             num(r["tok_s_total"], ".1f"), num(r["tok_s_seq"], ".1f"), num(r["tau"], ".2f"),
             num(r["speedup_total"], ".2f") + "x", num(r["speedup_seq"], ".2f") + "x", num(r["predicted_tau"], ".2f"),
             num(r["predicted_speedup"], ".2f") + "x"] for r in df.to_dict("records")]
    return markdown_table(headers, rows)


def _num_or_nan(v) -> float:
    return float(v) if v is not None and pd.notna(v) else math.nan
