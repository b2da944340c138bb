"""`spec-harness report` and `compare` on hand-made run folders: plots are real PNGs of the set size,
the CSV beside each holds the values the records give, compare's exit status follows regressions."""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import pandas as pd
import pytest

from harness import cli; from harness.reports import plots; from harness.reports import report
from test_summary import basic_run, make_prompt, make_steps, random_run, write_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WIDTH, HEIGHT = int(plots.FIGSIZE[0] * plots.DPI), int(plots.FIGSIZE[1] * plots.DPI)

# eagle's steps on each prompt: accepted drafts (K = 3) and surplus_use per committed position.
EAGLE = {"p1": ([2, 0], [[0.5, 0.5, 0.0], [0.0]]), "p2": ([3, 1], [[0.5] * 4, [0.5, 0.5]])}


def full_run(path: Path) -> Path:
    """ar and eagle on p1, p2 at batch sizes 1 and 2, eagle with meter records."""
    prompts, steps = [], []
    for bs, ar_wall, eagle_wall in ((1, 2.0, 0.5), (2, 1.0, 0.25)):
        for pid, (acc, surplus) in EAGLE.items():
            prompts.append(make_prompt("ar", pid, "chat", 10, ar_wall, batch_size=bs))
            prompts.append(make_prompt("eagle", pid, "chat", sum(acc) + len(acc), eagle_wall, False,
                                       batch_size=bs))
            steps += make_steps("ar", pid, "chat", [0] * 10, 0, batch_size=bs)
            steps += make_steps("eagle", pid, "chat", acc, 3, batch_size=bs, surplus_use=surplus)
    return write_run(path, prompts, steps, device="Test GPU 80GB", target="org/tiny-target")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="spec-harness")
    report.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = full_run(tmp_path_factory.mktemp("runs") / "full")
    table, figures, md = report.build_report([run])
    return run, table, figures, md


def test_all_plots_are_pngs_of_the_set_size(full_report):
    run, _, figures, _ = full_report
    names = {f.png.stem for f in figures}
    assert names == {"acceptance_by_position", "tau_speedup_by_category", "time_split", "tok_s_vs_batch",
                     "surplus_vs_acceptance"}
    for f in figures:
        assert f.png.parent == run and f.csv == f.png.with_suffix(".csv") and f.csv.exists()
        assert png_size(f.png) == (WIDTH, HEIGHT)
        assert f.png.stat().st_size > 10_000  # drawn, not blank
        assert "Test GPU 80GB" in f.caption and "org/tiny-target" in f.caption


def test_acceptance_csv_matches_records(full_report):
    run, *_ = full_report
    data = pd.read_csv(run / "acceptance_by_position.csv")
    one = data[data["series"] == "eagle bs=1"].sort_values("position")
    # eagle's steps accept 2, 0, 3, 1 of 3 drafts.
    assert list(one["position"]) == [1, 2, 3]
    assert one["unconditional"].tolist() == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    assert one["conditional"].tolist() == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert set(data["series"]) == {"eagle bs=1", "eagle bs=2"}  # ar never drafts


def test_tau_speedup_csv_matches_records(full_report):
    run, *_ = full_report
    data = pd.read_csv(run / "tau_speedup_by_category.csv").set_index(["series", "category"])
    assert data.loc[("eagle bs=1", "chat"), "tau"] == pytest.approx(10 / 4)
    assert data.loc[("eagle bs=1", "all"), "speedup"] == pytest.approx((10 / 1.0) / (20 / 4.0))
    assert data.loc[("eagle bs=2", "all"), "speedup"] == pytest.approx((10 / 0.5) / (20 / 2.0))
    assert data.loc[("ar bs=2", "all"), "tau"] == 1.0


def test_time_split_csv_matches_records(full_report):
    run, *_ = full_report
    data = pd.read_csv(run / "time_split.csv")
    for col, ms in (("draft_ms", 1.0), ("verify_ms", 3.0), ("accept_ms", 0.5), ("other_ms", 0.5), ("step_ms", 5.0)):
        assert data[col].tolist() == pytest.approx([ms] * 4), col


def test_tok_s_vs_batch_csv_matches_records(full_report):
    run, *_ = full_report
    data = pd.read_csv(run / "tok_s_vs_batch.csv").set_index(["series", "batch_size"])
    assert data.loc[("ar", 1), "tok_s"] == pytest.approx(20 / 4.0)
    assert data.loc[("ar", 2), "tok_s"] == pytest.approx(20 / 2.0)
    assert data.loc[("eagle", 1), "tok_s"] == pytest.approx(10 / 1.0)
    assert data.loc[("eagle", 2), "tok_s"] == pytest.approx(10 / 0.5)


def test_surplus_csv_matches_records(full_report):
    run, *_ = full_report
    data = pd.read_csv(run / "surplus_vs_acceptance.csv")
    one = data[data["series"] == "eagle bs=1"].sort_values("surplus_use")
    # per-step surplus sums 1.0, 0.0, 2.0, 1.0 with 2, 0, 3, 1 accepted of 3 drafted
    assert one["surplus_use"].tolist() == pytest.approx([0.0, 1.0, 2.0])
    assert one["accepted_per_step"].tolist() == pytest.approx([0.0, 1.5, 3.0])
    assert one["accept_rate"].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert one["steps"].tolist() == [1, 2, 1]


def test_report_md(full_report):
    run, table, figures, md = full_report
    assert md == run / "report.md"
    text = md.read_text()
    for f in figures:
        assert f"![{f.title}]({f.png.name})" in text and f.csv.name in text
    for label in ("Test GPU 80GB", "org/tiny-target", "tok/s [95% CI]", "conditional", "unconditional",
                  "Definitions", "surplus_use"):
        assert label in text
    assert len(table) == 8  # (ar, eagle) x (bs 1, 2) x (chat, all)


def test_plots_skipped_when_not_applicable(tmp_path):
    _, figures, _ = report.build_report([basic_run(tmp_path / "run")])
    assert {f.png.stem for f in figures} == {"acceptance_by_position", "tau_speedup_by_category", "time_split"}
    assert not (tmp_path / "run" / "tok_s_vs_batch.png").exists()


def test_several_runs_go_to_out_dir(tmp_path, capsys):
    a, b = basic_run(tmp_path / "a"), basic_run(tmp_path / "b", scale=2.0)
    assert run_cli("report", str(a), str(b), "--out", str(tmp_path / "out")) == 0
    data = pd.read_csv(tmp_path / "out" / "tau_speedup_by_category.csv")
    assert {"a:eagle", "b:eagle", "a:ar", "b:ar"} == set(data["series"])
    sp = data.set_index(["series", "category"])["speedup"]
    assert sp[("b:eagle", "math")] == pytest.approx(sp[("a:eagle", "math")] / 2)
    out = capsys.readouterr().out
    assert "| run " in out and "tok/s [95% CI]" in out
    assert not (a / "report.md").exists()


def test_compare_identical_runs_exit_0(tmp_path, capsys):
    base = random_run(tmp_path / "base", 40, seed=3)
    same = random_run(tmp_path / "same", 40, seed=3)
    assert run_cli("compare", str(base), str(same), "--fail-on", "tok_s,tau,speedup") == 0
    out = capsys.readouterr().out
    assert "worse" not in out and "tok_s" in out


def test_compare_injected_slowdown_exit_1(tmp_path, capsys):
    base = random_run(tmp_path / "base", 40, seed=3)
    slow = random_run(tmp_path / "slow", 40, seed=3, eagle_slowdown=3.0)
    assert run_cli("compare", str(base), str(slow), "--fail-on", "tok_s") == 1
    assert "worse" in capsys.readouterr().out
    assert run_cli("compare", str(base), str(slow), "--fail-on", "tau") == 0  # tau did not change
    assert run_cli("compare", str(base), str(slow)) == 0                        # nothing chosen to fail on
    assert run_cli("compare", str(slow), str(base), "--fail-on", "tok_s,speedup") == 0  # faster is fine


def test_compare_injected_acceptance_drop_exit_1(tmp_path):
    base = random_run(tmp_path / "base", 40, seed=3)
    worse = random_run(tmp_path / "worse", 40, seed=3, accept_cap=0)
    assert run_cli("compare", str(base), str(worse), "--fail-on", "tau") == 1


def test_compare_table_verdicts(tmp_path):
    base = report.summarize(random_run(tmp_path / "base", 40, seed=3))
    slow = report.summarize(random_run(tmp_path / "slow", 40, seed=3, eagle_slowdown=3.0))
    diff = report.compare_tables(base, slow, ["tok_s", "tau", "accept_rate"]).set_index(
        ["drafter", "category", "metric"])
    assert diff.loc[("eagle", "all", "tok_s"), "verdict"] == "worse"
    assert diff.loc[("eagle", "all", "tok_s"), "change_pct"] == pytest.approx(-100 * 2 / 3)
    assert diff.loc[("eagle", "all", "tau"), "verdict"] == "~"
    assert diff.loc[("ar", "all", "tok_s"), "verdict"] == "~"
    assert diff.loc[("eagle", "all", "accept_rate"), "verdict"] == "n/a"


def test_user_errors_exit_2_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ("harness.reports.report",))
    run = basic_run(tmp_path / "run")
    assert cli.main(["compare", str(run), str(tmp_path / "missing")]) == 2
    assert cli.main(["compare", str(run), str(run), "--fail-on", "accept_rate"]) == 2
    assert cli.main(["report", str(run), "--external", "no-name"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("spec-harness: error: ") for line in err)


def test_commands_registered():
    assert "harness.reports.report" in cli.COMMANDS and "harness.reports.specbench" in cli.COMMANDS
