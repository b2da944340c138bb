"""`spec-harness surplus RUN_DIR`: the information-surplus report, rebuilt from a run's raw records.

Reads steps.jsonl (meter fields, see harness.meter.core) and prompts.jsonl (finished prompts) and writes
  surplus.md                      the tables (also put into summary.md as a section)
  surplus.csv                     one row per drafter x category (and "all")
  surplus_calibration.csv         alpha_theory against observed acceptance, per drafter and depth
  surplus_vs_acceptance.png/.csv  surplus_use per prompt against the prompt's acceptance length

Per step (our estimators; the paper, arXiv 2507.19247 section 4.1, defines the surplus, not these):
  first_ub    surplus_ub at depth 1: bounds I(H_t; W_t) from above (base: unigram)
  surplus_ub  sum of surplus_ub over depths j >= 2: bounds the surplus of the committed window from above
  surplus_use sum of surplus_use over depths j >= 2 that have a draft distribution (bonus tokens have none;
              a step with no drafts adds 0); only for drafters with a q
Means are over steps (a step that emitted one token adds 0), with 95% intervals from a bootstrap over
prompts. Entropies: h_verify over every committed position; h_draft and h_verify_paired over the positions with a
draft distribution (accepted and rejected drafts), the paper's conjecture being h_draft > h_verify there.
Per prompt, for the correlations: tau (tokens emitted per step, bonus included), surplus_use per
committed token at depths >= 2, kl per committed draft row.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from harness.errors import UserError
from harness.records import read_jsonl

_BEGIN, _END = "<!-- surplus:begin -->", "<!-- surplus:end -->"
_REPS = 2000
_MIN_PROMPTS = 5


def _vals(lst, lo: int = 0) -> np.ndarray:
    return np.asarray([v for v in (lst or [])[lo:] if v is not None], dtype=np.float64)


class _Prompt:
    """Per-prompt sums of the per-step quantities (one drafter, one prompt)."""

    def __init__(self, category: str):
        self.category = category
        self.steps = 0
        self.sums: dict[str, float] = defaultdict(float)   # name -> sum over steps or tokens
        self.counts: dict[str, int] = defaultdict(int)     # name -> how many terms
        self.gt = 0                                        # steps with mean h_draft > mean h_verify

    def add(self, rec: dict) -> None:
        self.steps += 1
        self._add("tau", rec.get("emitted", 1))
        ub, use = rec.get("surplus_ub") or [], rec.get("surplus_use") or []
        if ub and ub[0] is not None:                       # the run had an n-gram base
            self._add("first_ub", ub[0])
            self._add("surplus_ub", float(_vals(ub, 1).sum()))
            self._add("surplus_use", float(_vals(use, 1).sum()))   # NaN-ed later for drafters with no q
        for v in _vals(use, 1):
            self._add("surplus_use_tok", v)
        for v in _vals(ub, 1):
            self._add("surplus_ub_tok", v)
        hv, hd = rec.get("h_verify") or [], rec.get("h_draft") or []
        for v in _vals(hv):
            self._add("h_verify", v)
        pairs = [(a, b) for a, b in zip(hv, hd) if a is not None and b is not None]
        if pairs:                                          # positions with a draft distribution
            gap = float(np.mean([b - a for a, b in pairs]))
            self._add("h_gap", gap)
            self.gt += gap > 0
            for a, b in pairs:
                self._add("h_verify_paired", a)
                self._add("h_draft", b)
        for v in _vals(rec.get("kl")):
            self._add("kl", v)

    def _add(self, name: str, v: float) -> None:
        self.sums[name] += float(v)
        self.counts[name] += 1

    def mean(self, name: str) -> float:
        n = self.counts.get(name, 0)
        return self.sums[name] / n if n else math.nan


def _ratio_ci(prompts: list[_Prompt], name: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean of `name` pooled over prompts, with a 95% bootstrap interval over prompts."""
    s = np.array([p.sums.get(name, 0.0) for p in prompts])
    c = np.array([p.counts.get(name, 0) for p in prompts], dtype=np.float64)
    if c.sum() == 0:
        return math.nan, math.nan, math.nan
    est = s.sum() / c.sum()
    if len(prompts) < 2:
        return est, math.nan, math.nan
    idx = rng.integers(0, len(prompts), size=(_REPS, len(prompts)))
    den = c[idx].sum(1)
    boot = s[idx].sum(1)[den > 0] / den[den > 0]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(est), float(lo), float(hi)


def spearman_ci(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Spearman rho (scipy) with a 95% percentile bootstrap interval over the pairs."""
    from scipy.stats import rankdata, spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < _MIN_PROMPTS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, math.nan
    rho = float(spearmanr(x, y).statistic)
    idx = rng.integers(0, len(x), size=(_REPS, len(x)))
    rx, ry = rankdata(x[idx], axis=1), rankdata(y[idx], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    boot = (rx * ry).sum(1)[den > 0] / den[den > 0]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return rho, float(lo), float(hi)


def analyse(run_dir) -> dict:
    """Everything the report shows, as plain data (rows for the CSVs)."""
    run_dir = Path(run_dir)
    steps_path = run_dir / "steps.jsonl"
    if not steps_path.exists():
        raise UserError(f"{steps_path} not found: give the folder of a run (results/<run-id>)")
    finished = {(r["drafter"], r["prompt_id"]) for r in read_jsonl(run_dir / "prompts.jsonl")}
    prompts: dict[tuple[str, str], _Prompt] = {}
    has_q: set[str] = set()                                # drafters that logged a draft distribution
    calib: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    metered = 0
    for rec in read_jsonl(steps_path):
        key = (rec["drafter"], rec["prompt_id"])
        if finished and key not in finished:
            continue
        if rec.get("h_verify") is None:
            continue
        metered += 1
        prompts.setdefault(key, _Prompt(rec.get("category", "")))
        prompts[key].add(rec)
        if any(v is not None for v in rec.get("h_draft") or []):
            has_q.add(rec["drafter"])
        alpha = rec.get("alpha_theory") or []
        acc, depth = rec.get("accepted", 0), rec.get("depth", rec.get("drafted", 0))
        for j, a in enumerate(alpha, start=1):
            if a is not None and j <= depth:
                calib[(rec["drafter"], j)].append((a, float(acc >= j)))
    if not metered:
        raise UserError(f"{steps_path} has no meter fields: rerun with the meter enabled")
    rng = np.random.default_rng(0)
    groups: dict[tuple[str, str], list[_Prompt]] = defaultdict(list)
    for (drafter, _), p in prompts.items():
        groups[(drafter, p.category)].append(p)
        groups[(drafter, "all")].append(p)
    cats: dict[str, set] = defaultdict(set)
    for (drafter, _), p in prompts.items():
        cats[drafter].add(p.category)
    table = []
    for (drafter, cat), ps in sorted(groups.items()):
        if cat == "all" or len(cats[drafter]) > 1:   # one category only: its row would repeat "all"
            row = {"drafter": drafter, "category": cat, "prompts": len(ps), "steps": sum(p.steps for p in ps)}
            for name in ("tau", "first_ub", "surplus_ub", "surplus_use", "surplus_ub_tok", "surplus_use_tok",
                         "h_verify", "h_verify_paired", "h_draft", "h_gap", "kl"):
                est, lo, hi = _ratio_ci(ps, name, rng)
                row[name], row[name + "_lo"], row[name + "_hi"] = est, lo, hi
            if drafter not in has_q:
                row["surplus_use"] = row["surplus_use_lo"] = row["surplus_use_hi"] = math.nan
            n_gap = sum(p.counts.get("h_gap", 0) for p in ps)
            row["share_h_draft_gt"] = sum(p.gt for p in ps) / n_gap if n_gap else math.nan
            tau = np.array([p.mean("tau") for p in ps])
            for name, x in (("use", np.array([p.mean("surplus_use_tok") for p in ps])),
                            ("kl", np.array([p.mean("kl") for p in ps]))):
                row[f"rho_{name}_tau"], row[f"rho_{name}_tau_lo"], row[f"rho_{name}_tau_hi"] = spearman_ci(x, tau, rng)
            table.append(row)
    calibration = []
    for (drafter, j), pairs in sorted(calib.items()):
        a = np.array(pairs)
        diff = a[:, 1] - a[:, 0]
        idx = rng.integers(0, len(a), size=(_REPS, len(a)))
        lo, hi = np.quantile(diff[idx].mean(1), [0.025, 0.975])
        calibration.append({"drafter": drafter, "depth": j, "n": len(a), "alpha_theory": a[:, 0].mean(),
                            "accepted": a[:, 1].mean(), "diff": diff.mean(), "diff_lo": lo, "diff_hi": hi})
    points = [{"drafter": d, "prompt_id": pid, "category": p.category, "steps": p.steps, "tau": p.mean("tau"),
               "surplus_use_tok": p.mean("surplus_use_tok"), "kl_tok": p.mean("kl"),
               "surplus_ub_step": p.sums.get("surplus_ub", math.nan) / p.steps}
              for (d, pid), p in sorted(prompts.items())]
    return {"table": table, "calibration": calibration, "points": points,
            "temperature": _temperature(run_dir)}


def _temperature(run_dir: Path):
    path = run_dir / "config.json"
    if not path.exists():
        return None
    stack = [json.loads(path.read_text())]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            if isinstance(obj.get("temperature"), (int, float)):
                return float(obj["temperature"])
            stack.extend(obj.values())
    return None


# ------------------------------------------------------------------ output
def _f(x, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(row: dict, name: str) -> str:
    if math.isnan(row[name]):
        return "—"
    if math.isnan(row[name + "_lo"]):
        return _f(row[name])
    return f"{_f(row[name])} [{_f(row[name + '_lo'])}, {_f(row[name + '_hi'])}]"


def _vs(row: dict) -> str:
    return "—" if math.isnan(row["h_draft"]) else f"{_f(row['h_draft'])} vs {_f(row['h_verify_paired'])}"


def render(res: dict) -> str:
    lines = [
        "## Information surplus",
        "",
        "Estimators are ours (arXiv 2507.19247 §4.1 defines the surplus, eqs 4.1-4.2, but gives none); see"
        " harness/meter/core.py. Nats; [95% bootstrap over prompts]. first_ub bounds I(H_t; W_t) and surplus_ub"
        " bounds the surplus I(H_t; W_t+1.. | W_t) of the committed window from above (per step, depth 1 and"
        " depths >= 2); surplus_use is the drafter's predictive V-information at depths >= 2.",
    ]
    t = res["temperature"]
    if t is not None and t == 0:
        lines.append("Greedy run: entropies, KL and alpha_theory are of the temperature-1 distributions, and"
                     " alpha_theory is the acceptance speculative sampling would have, not greedy matching.")
    lines += ["", "| drafter | category | prompts | steps | tau | first_ub | surplus_ub /step | surplus_use /step"
              " | surplus_use /token (j>=2) | h_verify | h_draft vs h_verify (same positions) | h_draft - h_verify"
              " | share of steps h_draft > h_verify |",
              "|" + "---|" * 13]
    for r in res["table"]:
        lines.append(f"| {r['drafter']} | {r['category']} | {r['prompts']} | {r['steps']} | {_f(r['tau'], 2)} | "
                     f"{_f(r['first_ub'])} | {_ci(r, 'surplus_ub')} | {_ci(r, 'surplus_use')} | "
                     f"{_ci(r, 'surplus_use_tok')} | {_f(r['h_verify'])} | {_vs(r)} | {_ci(r, 'h_gap')} | "
                     f"{_f(r['share_h_draft_gt'], 2)} |")
    lines += ["", "Spearman correlation with the acceptance length tau (per prompt):", "",
              "| drafter | category | prompts | rho(surplus_use /token, tau) | rho(kl, tau) |", "|---|---|---|---|---|"]
    for r in res["table"]:
        if not math.isnan(r["rho_use_tau"]) or not math.isnan(r["rho_kl_tau"]):
            lines.append(f"| {r['drafter']} | {r['category']} | {r['prompts']} | {_ci(r, 'rho_use_tau')} | "
                         f"{_ci(r, 'rho_kl_tau')} |")
    if res["calibration"]:
        lines += ["", "Calibration: mean alpha_theory at depth j against the observed acceptance of draft j, over"
                  " steps that drafted j tokens and accepted j - 1 (conditional acceptance).", "",
                  "| drafter | depth | n | alpha_theory | accepted | accepted - alpha [95%] |",
                  "|---|---|---|---|---|---|"]
        for c in res["calibration"]:
            lines.append(f"| {c['drafter']} | {c['depth']} | {c['n']} | {_f(c['alpha_theory'])} | "
                         f"{_f(c['accepted'])} | {_f(c['diff'])} [{_f(c['diff_lo'])}, {_f(c['diff_hi'])}] |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drafters = sorted({p["drafter"] for p in points})
    for d in drafters:
        pts = [p for p in points if p["drafter"] == d and math.isfinite(p["surplus_use_tok"])]
        if pts:
            ax.scatter([p["tau"] for p in pts], [p["surplus_use_tok"] for p in pts], s=14, alpha=0.75, label=d)
    ax.set_xlabel("mean acceptance length tau (tokens emitted / step, bonus included)")
    ax.set_ylabel("surplus_use at depths >= 2 (nats / token)")
    ax.set_title("Drafter's usable surplus against acceptance length, one point per prompt")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(title="drafter", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir) -> str:
    run_dir = Path(run_dir)
    res = analyse(run_dir)
    text = render(res)
    (run_dir / "surplus.md").write_text(text, encoding="utf-8")
    _write_csv(run_dir / "surplus.csv", res["table"])
    _write_csv(run_dir / "surplus_calibration.csv", res["calibration"])
    _write_csv(run_dir / "surplus_vs_acceptance.csv", res["points"])
    _plot(res["points"], run_dir / "surplus_vs_acceptance.png")
    summary = run_dir / "summary.md"
    section = f"{_BEGIN}\n{text}{_END}\n"
    old = summary.read_text(encoding="utf-8") if summary.exists() else ""
    if _BEGIN in old and _END in old:
        new = old[: old.index(_BEGIN)] + section + old[old.index(_END) + len(_END):].lstrip("\n")
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + section
    summary.write_text(new, encoding="utf-8")
    return text


def _cmd_surplus(args) -> int:
    print(write_report(args.run_dir), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser("surplus", help="information-surplus report of a run (needs meter fields in steps.jsonl)")
    p.add_argument("run_dir", help="the run's folder, results/<run-id>")
    p.set_defaults(func=_cmd_surplus)
