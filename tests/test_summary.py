"""Summary tables from hand-made run folders with known values (no model, no GPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.errors import UserError
from harness.reports.summary import (
    acceptance_by_position, bootstrap_ci, format_acceptance, format_table, summarize, write_summary,
)

PHASE_TIMES = {"t_draft": 0.001, "t_verify": 0.003, "t_accept": 0.0005, "t_other": 0.0005}


def make_steps(drafter, prompt_id, category, accepted, depth, suite="s", turn=0, batch_size=1, **extra):
    """Step records of one prompt: accepted[i] drafts accepted at step i out of depth[i] drafted."""
    depth = depth if isinstance(depth, list) else [depth] * len(accepted)
    out = []
    for i, (a, d) in enumerate(zip(accepted, depth)):
        rec = {"drafter": drafter, "prompt_id": prompt_id, "category": category, "suite": suite,
               "turn": turn, "step": i, "rank": 0, "batch_size": batch_size, "drafted": d, "depth": d,
               "accepted": a, "emitted": a + 1, **PHASE_TIMES}
        for k, v in extra.items():
            rec[k] = v[i]
        out.append(rec)
    return out


def make_prompt(drafter, prompt_id, category, new_tokens, wall_s, diverged=None, suite="s", **extra):
    return {"drafter": drafter, "prompt_id": prompt_id, "category": category, "suite": suite, "rank": 0,
            "prompt_tokens": 5, "new_tokens": new_tokens, "steps": 0, "drafted": 0, "accepted": 0,
            "wall_s": wall_s, "turns": ["text"], "output_ids": [[1] * new_tokens],
            "diverged": None if drafter == "ar" else diverged, **extra}


def write_run(path: Path, prompts: list[dict], steps: list[dict], device="Test GPU 80GB",
              target="tiny/target-1b") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "env.json").write_text(json.dumps({"device": device, "seed": 0}))
    (path / "config.json").write_text(json.dumps({"target": target, "command": "spec-harness run"}))
    with open(path / "steps.jsonl", "w") as fh:
        fh.writelines(json.dumps(s) + "\n" for s in steps)
    with open(path / "prompts.jsonl", "w") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in prompts)
    return path


def basic_run(path: Path, scale: float = 1.0) -> Path:
    """ar and eagle on prompts p1, p2 (math) and p3 (code); eagle also ran p4 (math), which ar did not.
    `scale` multiplies eagle's wall times (scale 2 = eagle twice as slow)."""
    prompts = [
        make_prompt("ar", "p1", "math", 10, 1.0), make_prompt("ar", "p2", "math", 20, 2.0),
        make_prompt("ar", "p3", "code", 30, 6.0),
        make_prompt("eagle", "p1", "math", 7, 0.5 * scale, False),
        make_prompt("eagle", "p2", "math", 8, 0.4 * scale, True),
        make_prompt("eagle", "p3", "code", 4, 1.0 * scale, False),
        make_prompt("eagle", "p4", "math", 4, 0.1 * scale, False),
    ]
    steps = (make_steps("ar", "p1", "math", [0] * 10, 0) + make_steps("ar", "p2", "math", [0] * 20, 0)
             + make_steps("ar", "p3", "code", [0] * 30, 0)
             + make_steps("eagle", "p1", "math", [0, 1, 3], 3)
             + make_steps("eagle", "p2", "math", [2, 3, 0], [2, 3, 3])
             + make_steps("eagle", "p3", "code", [1, 1], 3)
             + make_steps("eagle", "p4", "math", [3], 3))
    return write_run(path, prompts, steps)


def random_run(path: Path, n: int, seed: int = 1, eagle_slowdown: float = 1.0, accept_cap: int = 3) -> Path:
    """n prompts of category "c" run by ar and eagle (K = 3) with random wall times and acceptances;
    the same seed gives the same run, except eagle's wall times x eagle_slowdown and its accepted
    drafts capped at accept_cap."""
    rng = np.random.default_rng(seed)
    prompts, steps = [], []
    for i in range(n):
        acc = [min(int(a), accept_cap) for a in rng.integers(0, 4, size=5)]
        prompts.append(make_prompt("ar", f"q{i}", "c", 20, float(rng.uniform(1.0, 3.0))))
        prompts.append(make_prompt("eagle", f"q{i}", "c", sum(acc) + 5,
                                   float(rng.uniform(0.3, 1.5)) * eagle_slowdown, False))
        steps += make_steps("ar", f"q{i}", "c", [0] * 20, 0)
        steps += make_steps("eagle", f"q{i}", "c", acc, 3)
    return write_run(path, prompts, steps)


def row(df: pd.DataFrame, drafter: str, category: str, batch_size: int | None = None) -> pd.Series:
    sel = (df["drafter"] == drafter) & (df["category"] == category)
    if batch_size is not None:
        sel &= df["batch_size"] == batch_size
    assert sel.sum() == 1, df[["drafter", "category", "batch_size"]]
    return df[sel].iloc[0]


def test_basic_metrics_exact(tmp_path):
    df = summarize(basic_run(tmp_path / "run"))
    assert list(df["drafter"]) == ["ar"] * 3 + ["eagle"] * 3
    assert list(df["category"]) == ["code", "math", "all"] * 2
    e = row(df, "eagle", "all")
    assert e["prompts"] == 4 and e["new_tokens"] == 23 and e["steps"] == 9
    assert e["tau"] == pytest.approx(23 / 9)            # (7 + 8 + 4 + 4) emitted / 9 steps
    assert e["mean_accepted"] == pytest.approx(14 / 9)  # bonus excluded
    assert e["accept_rate"] == pytest.approx(14 / 26)   # accepted / drafted
    assert e["tok_s"] == pytest.approx(23 / 2.0)
    em = row(df, "eagle", "math")
    assert em["tau"] == pytest.approx(19 / 7)
    assert em["tok_s"] == pytest.approx(19 / 1.0)
    a = row(df, "ar", "all")
    assert a["tau"] == 1.0 and a["mean_accepted"] == 0.0
    assert math.isnan(a["accept_rate"])                 # nothing drafted
    assert a["speedup"] == pytest.approx(1.0)
    assert math.isnan(a["diverged"])


def test_speedup_is_paired_over_shared_prompts(tmp_path):
    df = summarize(basic_run(tmp_path / "run"))
    em = row(df, "eagle", "math")
    # p4 was not run by ar: speedup uses p1, p2 only (15 tok / 0.9 s against ar's 30 tok / 3 s),
    # while tok_s uses all four (19 / 1.0); the unpaired ratio 19 / 10 would be wrong.
    assert em["paired_prompts"] == 2
    assert em["speedup"] == pytest.approx((15 / 0.9) / (30 / 3.0))
    assert row(df, "eagle", "code")["speedup"] == pytest.approx((4 / 1.0) / (30 / 6.0))
    assert row(df, "eagle", "all")["speedup"] == pytest.approx((19 / 1.9) / (60 / 9.0))
    for cat in ("math", "all"):
        r = row(df, "eagle", cat)
        assert r["speedup_lo"] <= r["speedup"] <= r["speedup_hi"]
    assert math.isnan(row(df, "eagle", "code")["speedup_lo"])  # one prompt: no interval


def test_speedup_nan_without_ar(tmp_path):
    prompts = [make_prompt("eagle", "p1", "math", 4, 1.0, False)]
    df = summarize(write_run(tmp_path / "run", prompts, make_steps("eagle", "p1", "math", [3], 3)))
    r = row(df, "eagle", "all")
    assert math.isnan(r["speedup"]) and math.isnan(r["speedup_lo"]) and r["paired_prompts"] == 0
    assert r["tau"] == 4.0 and r["diverged"] == 0.0


def test_diverged_share(tmp_path):
    df = summarize(basic_run(tmp_path / "run"))
    assert row(df, "eagle", "all")["diverged"] == pytest.approx(1 / 4)
    assert row(df, "eagle", "math")["diverged"] == pytest.approx(1 / 3)
    assert row(df, "eagle", "code")["diverged"] == 0.0


def test_conditional_and_unconditional_acceptance_differ():
    # Steps (accepted, depth): (0, 3), (1, 3), (3, 3), (2, 2).
    # j=1: 3 of 4 steps accepted >= 1 -> both 3/4.
    # j=2: unconditional 2/4 (4 drafted >= 2); conditional 2/3 (step 1 stopped at position 1).
    # j=3: unconditional 1/3 (3 drafted >= 3); conditional 1/1 (only step 3 reached position 3).
    uncond, cond = acceptance_by_position(np.array([0, 1, 3, 2]), np.array([3, 3, 3, 2]), 3)
    np.testing.assert_allclose(uncond, [3 / 4, 2 / 4, 1 / 3])
    np.testing.assert_allclose(cond, [3 / 4, 2 / 3, 1.0])


def test_acceptance_columns_in_summary(tmp_path):
    prompts = [make_prompt("eagle", "p1", "math", 10, 1.0, False)]
    steps = make_steps("eagle", "p1", "math", [0, 1, 3, 2], [3, 3, 3, 2])
    df = summarize(write_run(tmp_path / "run", prompts, steps))
    r = row(df, "eagle", "all")
    assert [r[f"acc_uncond_{j}"] for j in (1, 2, 3)] == pytest.approx([3 / 4, 2 / 4, 1 / 3])
    assert [r[f"acc_cond_{j}"] for j in (1, 2, 3)] == pytest.approx([3 / 4, 2 / 3, 1.0])
    assert "acc_uncond_4" not in df
    text = format_acceptance(df)
    assert "conditional" in text and "unconditional" in text and "0.667" in text


def test_acceptance_nan_when_no_step_reaches_position(tmp_path):
    uncond, cond = acceptance_by_position(np.array([0, 0]), np.array([1, 2]), 3)
    assert uncond[0] == 0.0 and uncond[1] == 0.0 and math.isnan(uncond[2])
    assert cond[0] == 0.0 and math.isnan(cond[1]) and math.isnan(cond[2])


def test_time_shares(tmp_path):
    df = summarize(basic_run(tmp_path / "run"))
    r = row(df, "eagle", "all")
    assert [r["t_draft"], r["t_verify"], r["t_accept"], r["t_other"]] == pytest.approx([0.2, 0.6, 0.1, 0.1])
    assert r["t_step_ms"] == pytest.approx(5.0)


def test_bootstrap_contains_point_and_shrinks(tmp_path):
    small = row(summarize(random_run(tmp_path / "small", 8)), "eagle", "all")
    large = row(summarize(random_run(tmp_path / "large", 200)), "eagle", "all")
    for r in (small, large):
        for m in ("tok_s", "tau", "speedup"):
            assert r[f"{m}_lo"] < r[m] < r[f"{m}_hi"], m
    for m in ("tok_s", "tau", "speedup"):
        assert large[f"{m}_hi"] - large[f"{m}_lo"] < 0.6 * (small[f"{m}_hi"] - small[f"{m}_lo"]), m


def test_bootstrap_is_paired_and_deterministic():
    # Drafter always exactly twice as fast as ar on each prompt, but prompts vary wildly: a paired
    # resample gives a zero-width interval at 2; an unpaired one would not.
    nt = np.array([10.0, 100.0, 1000.0, 5.0])
    wall_ar = np.array([1.0, 30.0, 50.0, 0.1])
    cols = [nt, wall_ar / 2, nt, wall_ar]
    lo, hi = bootstrap_ci(cols, lambda a, b, c, d: (a / b) / (c / d))
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    assert bootstrap_ci([nt, wall_ar], lambda a, b: a / b) == bootstrap_ci([nt, wall_ar], lambda a, b: a / b)


def test_interrupted_attempt_and_unfinished_prompt_are_ignored(tmp_path):
    prompts = [make_prompt("eagle", "p1", "math", 8, 1.0, False)]
    steps = (make_steps("eagle", "p1", "math", [0, 0, 0, 0, 0], 3)   # aborted first attempt
             + make_steps("eagle", "p9", "math", [3, 3], 3)         # never finished
             + make_steps("eagle", "p1", "math", [3, 2], 3))        # the attempt that finished
    r = row(summarize(write_run(tmp_path / "run", prompts, steps)), "eagle", "all")
    assert r["steps"] == 2 and r["tau"] == pytest.approx(7 / 2) and r["prompts"] == 1


def test_batch_sizes_grouped_and_extra_keys(tmp_path):
    prompts, steps = [], []
    for bs, ar_wall, eagle_wall in ((1, 2.0, 1.0), (4, 4.0, 1.0)):
        for pid in ("p1", "p2"):
            prompts.append(make_prompt("ar", pid, "c", 10, ar_wall, batch_size=bs, process=0))
            prompts.append(make_prompt("eagle", pid, "c", 10, eagle_wall, False, batch_size=bs, process=1))
            steps += make_steps("ar", pid, "c", [0] * 10, 0, batch_size=bs)
            steps += make_steps("eagle", pid, "c", [1] * 5, 2, batch_size=bs)
    df = summarize(write_run(tmp_path / "run", prompts, steps))
    assert sorted(df["batch_size"].unique()) == [1, 4]
    assert row(df, "eagle", "all", 1)["speedup"] == pytest.approx(2.0)
    assert row(df, "eagle", "all", 4)["speedup"] == pytest.approx(4.0)
    assert row(df, "eagle", "all", 4)["prompts"] == 2
    assert "batch" in format_table(df)


def test_batch_size_taken_from_steps_when_prompts_lack_it(tmp_path):
    prompts = [make_prompt("eagle", "p1", "c", 4, 1.0, False)]
    df = summarize(write_run(tmp_path / "run", prompts, make_steps("eagle", "p1", "c", [3], 3, batch_size=8)))
    assert list(df["batch_size"]) == [8, 8]  # category c and all


def test_meter_columns(tmp_path):
    prompts = [make_prompt("eagle", "p1", "c", 5, 1.0, False)]
    steps = make_steps("eagle", "p1", "c", [1, 2], 3,
                       surplus_use=[[0.5, 0.25], [1.0, 0.0, 0.5]], surplus_ub=[[1.0, 1.0], [2.0, 2.0, 2.0]],
                       kl=[[0.1, 0.3], [0.2, 0.2, 0.2]], alpha_theory=[[0.9, 0.5], [1.0, 1.0, 0.4]],
                       h_verify=[[1.0, 2.0], [3.0, 3.0, 3.0]], h_draft=[[1.0, 1.0], [1.0, 1.0, 1.0]])
    r = row(summarize(write_run(tmp_path / "run", prompts, steps)), "eagle", "all")
    # mean over steps of per-step sums over depths j >= 2 (depth 1 bounds I(H_t; W_t), not the surplus)
    assert r["surplus_use"] == pytest.approx((0.25 + 0.5) / 2)
    assert r["surplus_ub"] == pytest.approx((1.0 + 4.0) / 2)
    assert r["kl"] == pytest.approx(1.0 / 5)                       # mean over committed positions
    assert r["alpha_theory"] == pytest.approx(3.8 / 5)
    assert r["h_verify"] == pytest.approx(12.0 / 5)
    assert r["h_draft"] == pytest.approx(1.0)


def test_no_meter_columns_without_meter(tmp_path):
    df = summarize(basic_run(tmp_path / "run"))
    assert "surplus_use" not in df and "kl" not in df


def test_write_summary_files(tmp_path):
    run = basic_run(tmp_path / "run")
    df = write_summary(run)
    back = pd.read_csv(run / "summary.csv")
    assert len(back) == len(df)
    assert back["tau"].to_numpy() == pytest.approx(df["tau"].to_numpy())
    md = (run / "summary.md").read_text()
    for label in ("tok/s [95% CI]", "tau", "accepted/step", "speedup vs ar", "diverged from ar",
                  "conditional", "unconditional", "Definitions"):
        assert label in md
    e = row(df, "eagle", "all")
    assert f"{e['tau']:.2f} [" in md and "25.0%" in md


def test_missing_or_empty_run_is_user_error(tmp_path):
    with pytest.raises(UserError):
        summarize(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        summarize(tmp_path / "empty")
