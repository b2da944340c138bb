"""`spec-harness report` (tables, plots and report.md from run folders) and `spec-harness compare`
(the change between two runs, judged against the bootstrap intervals).

Everything is rebuilt from the raw records (harness.reports.summary), so it works on any machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.reports import plots
from harness.errors import UserError
from harness.records import _read_json, _text, run_info
from harness.reports.summary import (
    DEFINITIONS, format_acceptance, format_meters, format_table, format_time_split, list_stats,
    load_records, markdown_table, summarize, summarize_records,
)

# Metrics compare can judge against intervals, and which way is better (+1: higher is better).
CI_METRICS = {"tok_s": 1, "tau": 1, "speedup": 1}
OTHER_METRICS = {"mean_accepted": 1, "accept_rate": 1, "diverged": -1, "t_step_ms": -1}
ROW_KEY = ["drafter", "suite", "category", "batch_size"]


# ----------------------------------------------------------------------------- run folders

@dataclass
class Run:
    path: Path
    name: str
    device: str
    target: str
    commit: str
    command: str
    summary: pd.DataFrame
    steps: pd.DataFrame


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    prompts, steps = load_records(run_dir)
    info = run_info(run_dir)
    summary = summarize_records(prompts, steps).assign(run=info["name"])
    per_step = steps[["drafter", "batch_size", "accepted", "depth"]].copy()
    per_step["surplus_use"] = np.nan
    if "surplus_use" in steps:
        sums, counts = list_stats(steps["surplus_use"])
        per_step["surplus_use"] = np.where(counts > 0, sums, np.nan)
    per_step["run"] = info["name"]
    return Run(run_dir, info["name"], info["device"], info["target"], info["commit"], info["command"],
               summary, per_step)


def _label(frame: pd.DataFrame, several_runs: bool, several_batches: bool) -> tuple[pd.Series, pd.Series]:
    """(line, series): line = drafter (run:drafter for several runs); series adds the batch size."""
    line = frame["drafter"].astype(str)
    if several_runs:
        line = frame["run"].astype(str) + ":" + line
    series = line + " bs=" + frame["batch_size"].astype(int).astype(str) if several_batches else line
    return line, series


def caption(runs: list[Run]) -> str:
    def one(values):
        values = list(dict.fromkeys(values))
        return values[0] if len(values) == 1 else ", ".join(values)
    return (f"run: {one(r.name for r in runs)} | device: {one(r.device for r in runs)} | "
            f"target: {one(r.target for r in runs)}")


# ----------------------------------------------------------------------------- report

def parse_external(spec: str) -> tuple[Path, str, str | None]:
    """FILE:NAME or FILE:NAME:MODEL_ID."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise UserError(f"--external {spec!r}: write FILE:NAME (or FILE:NAME:MODEL_ID for a file with "
                        "several models)")
    return Path(parts[0]), parts[1], (parts[2] or None) if len(parts) == 3 else None


def build_report(run_dirs: list[Path], out_dir: Path | None = None,
                 externals: list[str] = ()) -> tuple[pd.DataFrame, list[plots.Figure], Path]:
    """Writes report.md, the PNG plots and their CSVs; returns (table, figures, report path)."""
    from harness.reports.specbench import import_specbench

    runs = [load_run(Path(d)) for d in run_dirs]
    out_dir = Path(out_dir) if out_dir is not None else runs[0].path
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.concat([r.summary for r in runs], ignore_index=True)
    several_runs = len(runs) > 1
    several_batches = table["batch_size"].nunique() > 1
    table["line"], table["series"] = _label(table, several_runs, several_batches)
    steps = pd.concat([r.steps for r in runs], ignore_index=True)
    steps["line"], steps["series"] = _label(steps, several_runs, several_batches)

    cap = caption(runs)
    figures = [f for f in (
        plots.acceptance_by_position(table, out_dir, cap),
        plots.tau_speedup_by_category(table, out_dir, cap),
        plots.time_split(table, out_dir, cap),
        plots.tok_s_vs_batch(table, out_dir, cap),
        plots.surplus_vs_acceptance(steps, out_dir, cap),
    ) if f is not None]

    own = table.drop(columns=["line", "series"])
    external = [import_specbench(*parse_external(spec)) for spec in externals]
    shown = pd.concat([own, pd.DataFrame(external)], ignore_index=True) if external else own

    report = out_dir / "report.md"
    report.write_text(_report_markdown(runs, own, shown, external, figures, out_dir), encoding="utf-8")
    return shown, figures, report


def _report_markdown(runs: list[Run], own: pd.DataFrame, shown: pd.DataFrame, external: list[dict],
                     figures: list[plots.Figure], out_dir: Path) -> str:
    lines = ["# spec-harness report", ""]
    run_rows = [[r.name, r.device, r.target, r.commit, f"`{r.command}`"] for r in runs]
    lines += [markdown_table(["run", "device", "target", "commit", "command"], run_rows), "",
              "## Results", "", format_table(shown), ""]
    for r in external:
        lines.append(f"External row `{r['drafter']}`: {r['source']} (model_id {r['model_id']}), measured "
                     "elsewhere: no speedup against this run's ar, no acceptance by position.")
    if external:
        lines.append("")
    lines += ["## Acceptance by draft position (conditional and unconditional)", "",
              format_acceptance(own), "", "## Time per step (share of step time)", "",
              format_time_split(own), ""]
    meters = format_meters(own)
    if meters:
        lines += ["## Meter (information surplus)", "", meters, ""]
    lines += ["## Plots", ""]
    for f in figures:
        png, csv = _relative(f.png, out_dir), _relative(f.csv, out_dir)
        lines += [f"### {f.title}", "", f"![{f.title}]({png})", "", f"*{f.caption}* (data: [{csv}]({csv}))", ""]
    lines += [DEFINITIONS, ""]
    return "\n".join(lines)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)


def _cmd_report(args) -> int:
    table, figures, report = build_report(args.run_dirs, args.out, args.external or [])
    print(format_table(table))
    print(f"\nwrote {report} and {len(figures)} plots (PNG + CSV) in {report.parent}")
    return 0


# ----------------------------------------------------------------------------- compare

def _metric_list(text: str, option: str, allowed: dict) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in allowed]
    if bad:
        raise UserError(f"{option}: unknown metric {', '.join(bad)}; choose from {', '.join(allowed)}")
    return names


def compare_tables(base: pd.DataFrame, new: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (drafter, suite, category, batch size) x metric present in both runs: base, new,
    change (%), and verdict: 'worse' / 'better' when the new interval lies wholly below / above the
    base interval (in the metric's good direction), '~' when they overlap, 'n/a' without intervals."""
    both = base.merge(new, on=ROW_KEY, suffixes=("_base", "_new"), how="inner")
    out = []
    for r in both.to_dict("records"):
        for m in metrics:
            b, n = float(r.get(f"{m}_base", math.nan)), float(r.get(f"{m}_new", math.nan))
            change = (n - b) / abs(b) * 100 if b and math.isfinite(b) and math.isfinite(n) else math.nan
            verdict = "n/a"
            if m in CI_METRICS:
                blo, bhi = r.get(f"{m}_lo_base", math.nan), r.get(f"{m}_hi_base", math.nan)
                nlo, nhi = r.get(f"{m}_lo_new", math.nan), r.get(f"{m}_hi_new", math.nan)
                if all(math.isfinite(float(v)) for v in (blo, bhi, nlo, nhi)):
                    below, above = nhi < blo, nlo > bhi
                    worse, better = (below, above) if CI_METRICS[m] > 0 else (above, below)
                    verdict = "worse" if worse else "better" if better else "~"
            out.append({**{k: r[k] for k in ROW_KEY}, "metric": m, "base": b, "new": n,
                        "change_pct": change, "verdict": verdict})
    return pd.DataFrame(out, columns=[*ROW_KEY, "metric", "base", "new", "change_pct", "verdict"])


def format_compare(diff: pd.DataFrame) -> str:
    def num(v: float, fmt: str) -> str:
        return format(v, fmt) if math.isfinite(v) else "n/a"

    rows = [[r["drafter"], f"{r['batch_size']:g}", r["category"], r["metric"], num(r["base"], ".4g"),
             num(r["new"], ".4g"), num(r["change_pct"], "+.1f") + ("%" if math.isfinite(r["change_pct"]) else ""),
             r["verdict"]] for r in diff.to_dict("records")]
    return markdown_table(["drafter", "batch", "category", "metric", "base", "new", "change", "vs 95% CI"], rows)


def _cmd_compare(args) -> int:
    allowed = {**CI_METRICS, **OTHER_METRICS}
    metrics = _metric_list(args.metrics, "--metrics", allowed)
    fail_on = _metric_list(args.fail_on, "--fail-on", CI_METRICS) if args.fail_on else []
    metrics += [m for m in fail_on if m not in metrics]
    base, new = summarize(args.base), summarize(args.new)
    diff = compare_tables(base, new, metrics)
    if diff.empty:
        raise UserError("the two runs share no drafter x category x batch size; compare runs of the same suite")
    print(format_compare(diff))
    only = set(map(tuple, base[ROW_KEY].to_numpy())) ^ set(map(tuple, new[ROW_KEY].to_numpy()))
    if only:
        print(f"\n{len(only)} rows are in only one of the runs and are not compared")
    bad = diff[diff["metric"].isin(fail_on) & (diff["verdict"] == "worse")]
    if len(bad):
        print(f"\nregression beyond the 95% interval: {len(bad)} of {', '.join(fail_on)} "
              f"({', '.join(sorted(set(bad['drafter'] + '/' + bad['category'] + ' ' + bad['metric'])))})")
        return 1
    return 0


# ----------------------------------------------------------------------------- CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="tables, plots and report.md from one or more run folders")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="results/<run> folders")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write report.md and plots (default: the first run's folder)")
    p.add_argument("--external", action="append", metavar="FILE:NAME",
                   help="add a Spec-Bench answer file as a row named NAME (FILE:NAME:MODEL_ID to pick "
                        "one model of several); repeatable")
    p.set_defaults(func=_cmd_report)

    c = subparsers.add_parser("compare", help="change between two runs, judged against bootstrap intervals")
    c.add_argument("base", type=Path, metavar="BASE_RUN")
    c.add_argument("new", type=Path, metavar="NEW_RUN")
    c.add_argument("--metrics", default="tok_s,tau,speedup,accept_rate",
                   help=f"comma-separated, from {', '.join({**CI_METRICS, **OTHER_METRICS})}")
    c.add_argument("--fail-on", default="",
                   help=f"exit 1 when one of these ({', '.join(CI_METRICS)}) gets worse beyond its 95%% "
                        "interval, e.g. tok_s,tau")
    c.set_defaults(func=_cmd_compare)

