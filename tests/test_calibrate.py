"""The cost model (harness.calibrate): predicted tokens per step by hand, K auto on a synthetic timing
table, and calibration end to end on a tiny model (the CLI, and a run with --k auto)."""

from __future__ import annotations

import json
import math

import pytest

from harness.calibrate import Calibration, expected_emitted, load_calibrations, plan_for_run, save_calibrations
from harness.cli import main
from harness.config import RunConfig
from harness.records import read_jsonl


def test_expected_emitted_by_hand():
    a = [0.8, 0.5, 0.5]
    assert expected_emitted(a, [1, 1, 1], 0) == 1.0
    assert expected_emitted(a, [1, 1, 1], 3) == pytest.approx(1 + 0.8 + 0.4 + 0.2)
    # n-gram: a second draft exists half the time -> P(acc >= 2) = 0.8 * 0.5 * 0.5
    assert expected_emitted(a, [1, 0.5, 1], 3) == pytest.approx(1 + 0.8 + 0.2 + 0.1)
    assert expected_emitted(a + [math.nan], [1, 1, 1, 1], 5) == pytest.approx(2.4)  # never reached: 0


def synthetic(batch_sizes=(1, 8)) -> Calibration:
    """Forward cost grows with tokens per forward, more steeply at batch 8; drafts cost 1 ms each."""
    kmax = 6
    fwd = {b: {t: 0.010 + (0.0005 if b == 1 else 0.004) * t for t in range(1, kmax + 2)} for b in batch_sizes}
    return Calibration(target="tiny", drafter="ngram", device="cpu", dtype="float32", temperature=0.0, k_max=kmax,
                       context=16, batch_sizes=list(batch_sizes), t_forward=fwd,
                       t_draft={b: {k: 0.001 * k for k in range(1, kmax + 1)} for b in batch_sizes},
                       t_accept={b: {k: 0.0002 for k in range(kmax + 1)} for b in batch_sizes},
                       accept_cond=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], draft_avail=[1.0] * kmax)


def test_k_auto_is_argmax_of_predicted_speed():
    cal = synthetic()
    for b in (1, 8):
        speed = {}
        for k in range(1, 7):
            e = expected_emitted(cal.accept_cond, cal.draft_avail, k)
            speed[k] = e / (0.001 * k + cal.t_forward[b][k + 1] + 0.0002)
        assert cal.best_k(b) == max(speed, key=speed.get)
        p = cal.predict(b, cal.best_k(b))
        assert p["predicted_speedup"] == pytest.approx(speed[cal.best_k(b)] * (cal.t_forward[b][1] + 0.0002))
    assert cal.best_k(1) > cal.best_k(8)  # verification is dearer in a big batch: shorter drafts


def test_run_plan_uses_given_calibration(tmp_path):
    path = tmp_path / "cal.json"
    save_calibrations(path, {"ngram": synthetic()})
    assert load_calibrations(path)["ngram"].t_forward == synthetic().t_forward

    class Tiny:
        name = "tiny"

    cfg = RunConfig(k=3, batch_size=8, extra={"k_auto": True, "calibration": str(path)})
    k, pred = plan_for_run(cfg, Tiny(), object(), "ngram", tmp_path)
    assert k == synthetic().best_k(8) and pred == synthetic().predict(8, k)
    cfg = RunConfig(k=3, batch_size=1, extra={"calibration": str(path)})  # fixed K: predicted, not chosen
    assert plan_for_run(cfg, Tiny(), object(), "ngram", tmp_path) == (3, synthetic().predict(1, 3))


def test_calibrate_cli_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cal.json"
    rc = main(["calibrate", "--target", str(tiny_dir), "--drafter", "ngram,layerskip", "--batch-sizes", "1,2",
               "--k-max", "3", "--repeats", "2", "--warmup", "1", "--context", "16", "--max-new-tokens", "8",
               "--limit", "2", "--device", "cpu", "--max-len", "256", "--layerskip-layers", "2", "--out", str(out)])
    assert rc == 0 and "speedup vs ar" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data["calibrations"]) == {"ngram", "layerskip"}
    for name, c in data["calibrations"].items():
        assert c["batch_sizes"] == [1, 2] and sorted(map(int, c["t_forward"]["2"])) == [1, 2, 3, 4]
        assert sorted(map(int, c["t_draft"]["1"])) == [1, 2, 3] and sorted(map(int, c["t_accept"]["1"])) == [0, 1, 2, 3]
        assert len(c["accept_cond"]) == 3 and c["acceptance_steps"] > 0
        assert all(v > 0 for row in c["t_forward"].values() for v in row.values())
        assert sum(r["best"] for r in c["predictions"]) == 2  # one best K per batch size
    # a model drafter always drafts K: d_j = 1 (NaN where no step got that far)
    assert all(d == 1.0 or math.isnan(d) for d in data["calibrations"]["layerskip"]["draft_avail"])


def test_run_with_k_auto_measures_and_reports(tiny_dir, tmp_path):
    from harness.reports.summary import batch_summary
    from harness.runner import run

    cfg = RunConfig(target=str(tiny_dir), backend="native", drafters=("ar", "ngram"), suite="calibration", limit=3,
                    max_new_tokens=8, device="cpu", max_len=256, out=str(tmp_path), run_id="auto", meter=False,
                    warmup=0, batch_size=2, extra={"k_auto": True})
    out = run(cfg)
    cal = load_calibrations(out / "calibration.json")["ngram"]
    assert cal.batch_sizes == [2]
    runs = {r["drafter"]: r for r in read_jsonl(out / "batch_runs.jsonl")}
    assert runs["ngram"]["k_auto"] and runs["ngram"]["k"] == cal.best_k(2)
    assert runs["ngram"]["predicted_speedup"] == pytest.approx(cal.predict(2, cal.best_k(2))["predicted_speedup"])
    df = batch_summary(out).set_index("drafter")
    assert math.isfinite(df.loc["ngram", "predicted_speedup"]) and math.isfinite(df.loc["ngram", "speedup_total"])
