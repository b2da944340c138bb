"""Spec-Bench answer files: export a run, import it back, same tok/s and tau."""

from __future__ import annotations

import argparse
import json

import pytest

from harness.reports import report; from harness.reports import specbench
from harness.errors import UserError
from harness.reports.summary import summarize
from test_summary import PHASE_TIMES, basic_run, make_prompt, make_steps, row, write_run


def export(run, out) -> int:
    parser = argparse.ArgumentParser(prog="spec-harness")
    specbench.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export-specbench", str(run), "--out", str(out)])
    return args.func(args)


def two_turn_run(path):
    """eagle on one prompt of two turns: 3 steps in turn 0 (emitting 1, 2, 4) and 2 in turn 1 (3, 1)."""
    steps = (make_steps("eagle", "q1", "chat", [0, 1, 3], 3, turn=0)
             + make_steps("eagle", "q1", "chat", [2, 0], 3, turn=1))
    steps[-1]["t_verify"] += 0.005  # the second turn's steps take 0.015 s of the 0.025 s total
    prompt = make_prompt("eagle", "q1", "chat", 11, 2.5, False, turns=["first answer", "second answer"],
                         output_ids=[[1] * 7, [2] * 4])
    return write_run(path, [prompt], steps, target="org/tiny-target")


def test_export_format(tmp_path):
    out = tmp_path / "answers" / "run.jsonl"
    assert export(two_turn_run(tmp_path / "run"), out) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["question_id"] == "q1" and line["model_id"] == "tiny-target-eagle"
    (choice,) = line["choices"]
    assert choice["index"] == 0
    assert choice["turns"] == ["first answer", "second answer"]
    assert choice["new_tokens"] == [7, 4]
    assert choice["decoding_steps"] == [3, 2]
    assert choice["accept_lengths"] == [[1, 2, 4], [3, 1]]
    step = sum(PHASE_TIMES.values())
    assert choice["wall_time"] == pytest.approx([2.5 * 3 * step / (5 * step + 0.005),
                                                 2.5 * (2 * step + 0.005) / (5 * step + 0.005)])
    assert sum(choice["wall_time"]) == pytest.approx(2.5, abs=1e-12)


def test_round_trip_gives_same_tok_s_and_tau(tmp_path):
    run = basic_run(tmp_path / "run")
    out = tmp_path / "answers.jsonl"
    export(run, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 7  # one per (drafter, prompt)
    df = summarize(run)
    for drafter in ("ar", "eagle"):
        back = specbench.import_specbench(out, f"ext-{drafter}", f"target-1b-{drafter}")
        mine = row(df, drafter, "all")
        assert back["tok_s"] == pytest.approx(mine["tok_s"], rel=1e-12)
        assert back["tau"] == pytest.approx(mine["tau"], rel=1e-12)
        assert back["prompts"] == mine["prompts"] and back["steps"] == mine["steps"]
        assert back["tok_s_lo"] == pytest.approx(mine["tok_s_lo"])
        assert back["drafter"] == f"ext-{drafter}"


def test_round_trip_two_turns(tmp_path):
    run = two_turn_run(tmp_path / "run")
    out = tmp_path / "a.jsonl"
    export(run, out)
    back = specbench.import_specbench(out, "x")
    assert back["tok_s"] == pytest.approx(11 / 2.5) and back["tau"] == pytest.approx(11 / 5)


def test_import_without_accept_lengths(tmp_path):
    f = tmp_path / "baseline.jsonl"
    recs = [{"question_id": i, "model_id": "vicuna-baseline",
             "choices": [{"index": 0, "turns": ["a", "b"], "new_tokens": [10, 20], "wall_time": [1.0, 2.0],
                          "decoding_steps": [10, 20]}]} for i in range(3)]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    back = specbench.import_specbench(f, "base")
    assert back["tok_s"] == pytest.approx(10.0) and back["tau"] == pytest.approx(1.0)


def test_import_errors(tmp_path):
    run = basic_run(tmp_path / "run")
    out = tmp_path / "a.jsonl"
    export(run, out)
    with pytest.raises(UserError, match="several models"):
        specbench.import_specbench(out, "x")
    with pytest.raises(UserError, match="no model_id"):
        specbench.import_specbench(out, "x", "nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(UserError, match="not a Spec-Bench answer line"):
        specbench.import_specbench(bad, "x")
    with pytest.raises(UserError):
        specbench.import_specbench(tmp_path / "missing.jsonl", "x")


def test_report_external_row(tmp_path, capsys):
    run = basic_run(tmp_path / "run")
    out = tmp_path / "a.jsonl"
    export(run, out)
    parser = argparse.ArgumentParser(prog="spec-harness")
    report.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run), "--external", f"{out}:theirs:target-1b-eagle"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("| theirs"))
    eagle = row(summarize(run), "eagle", "all")
    assert f"{eagle['tok_s']:.1f} [" in line and f"{eagle['tau']:.2f} [" in line
    assert "External row `theirs`" in (run / "report.md").read_text()
