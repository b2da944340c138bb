"""Spec-Bench answer files: our exporter's files read the way Spec-Bench's evaluation scripts read them,
and imported back as a report row."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from harness.errors import UserError
from harness.records import read_jsonl
from harness.reports import report, specbench
from harness.reports.summary import summarize
from test_summary import PHASE_TIMES, basic_run, make_prompt, make_steps, row, write_run


# ----------------------------------------------------------------------------- a Spec-Bench reader
# Written here from what Spec-Bench's evaluation/speed.py and evaluation/equal.py read (no code copied):
# - an answer file holds one method; each line is a JSON object with question_id, category, model_id and
#   choices[0] = {turns, new_tokens, wall_time, accept_lengths, ...}; "overall" takes every line, a task
#   name only the lines of that category;
# - tokens/s of a method: the mean over its answers of sum(new_tokens) / sum(wall_time);
# - accept lengths: every answer's choices[0]["accept_lengths"] appended to one list, then its numpy
#   mean is "#Mean accepted tokens" (a list of per-turn lists of unequal length cannot be averaged);
# - tokens/s of the baseline: per answer, the tokens of each turn's text (tokenizer ids less one, the
#   BOS) summed, over sum(wall_time), averaged over answers; speedup = method tokens/s / baseline's;
# - equality: str(choices[0]["turns"]) of two files compared line by line, in file order.

def read_answers(path: Path, task: str = "overall") -> list[dict]:
    lines = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    return [x for x in lines if task == "overall" or x["category"] == task]


def specbench_speed(method_file: Path, base_file: Path, n_tokens, task: str = "overall") -> dict:
    rates, accept = [], []
    for ans in read_answers(method_file, task):
        choice = ans["choices"][0]
        rates.append(sum(choice["new_tokens"]) / sum(choice["wall_time"]))
        accept.extend(choice["accept_lengths"])
    base = []
    for ans in read_answers(base_file, task):
        choice = ans["choices"][0]
        base.append(sum(n_tokens(text) - 1 for text in choice["turns"]) / sum(choice["wall_time"]))
    return {"tok_s": float(np.mean(rates)), "base_tok_s": float(np.mean(base)),
            "speedup": float(np.mean(rates) / np.mean(base)), "mean_accepted": float(np.mean(accept))}


def specbench_equal(file_a: Path, file_b: Path) -> bool:
    a = [str(x["choices"][0]["turns"]) for x in read_answers(file_a)]
    b = [str(x["choices"][0]["turns"]) for x in read_answers(file_b)]
    return all(x == y for x, y in zip(a, b))


def words(text: str) -> int:
    """A stand-in tokenizer's id count: a BOS plus one id per word."""
    return 1 + len(text.split())


# ----------------------------------------------------------------------------- runs and the exporter

def export(run, out, *extra) -> int:
    parser = argparse.ArgumentParser(prog="spec-harness")
    specbench.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export-specbench", str(run), "--out", str(out), *extra])
    return args.func(args)


def two_turn_run(path):
    """eagle on one prompt of two turns: 3 steps in turn 0 (emitting 1, 2, 4) and 2 in turn 1 (3, 1)."""
    steps = (make_steps("eagle", "q1", "chat", [0, 1, 3], 3, turn=0)
             + make_steps("eagle", "q1", "chat", [2, 0], 3, turn=1))
    steps[-1]["t_verify"] += 0.005  # the second turn's steps take 0.015 s of the 0.025 s total
    prompt = make_prompt("eagle", "q1", "chat", 11, 2.5, False, turns=["first answer", "second answer"],
                         output_ids=[[1] * 7, [2] * 4])
    return write_run(path, [prompt], steps, target="org/tiny-target")


def text(n: int) -> str:
    return " ".join(["w"] * n)


def speed_run(path: Path, ar_wall=(2.0, 2.0, 2.0, 2.0), eagle_wall=(0.8, 0.8, 0.8, 0.8)) -> Path:
    """ar and eagle on four prompts (math: 10 and 2; code: 1 and 3), eagle's second turn on prompt 10;
    answer texts with one word per new token."""
    accepted = {"10": ([0, 2, 1], [1, 3]), "2": ([3, 3], ()), "1": ([1, 0, 0, 2], ()), "3": ([2], ())}
    cats = {"10": "math", "2": "math", "1": "code", "3": "code"}
    prompts, steps = [], []
    for i, (pid, turns) in enumerate(accepted.items()):
        turns = [t for t in turns if t]
        counts = [sum(a) + len(a) for a in turns]
        for drafter, wall in (("ar", ar_wall[i]), ("eagle", eagle_wall[i])):
            prompts.append(make_prompt(drafter, pid, cats[pid], sum(counts), wall, False,
                                       turns=[text(c) for c in counts], output_ids=[[7] * c for c in counts]))
            for t, acc in enumerate(turns):
                steps += make_steps(drafter, pid, cats[pid], [0] * counts[t] if drafter == "ar" else list(acc),
                                    0 if drafter == "ar" else 3, turn=t)
    return write_run(path, prompts, steps)


def files(out: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(out.glob("*.jsonl"))}


# ----------------------------------------------------------------------------- the layout

def test_export_format(tmp_path):
    out = tmp_path / "answers"
    assert export(two_turn_run(tmp_path / "run"), out) == 0
    assert list(files(out)) == ["tiny-target-eagle"]  # one file per method, named by its model_id
    (line,) = read_answers(out / "tiny-target-eagle.jsonl")
    assert line["question_id"] == "q1" and line["model_id"] == "tiny-target-eagle" and line["category"] == "chat"
    assert isinstance(line["tstamp"], float)
    (choice,) = line["choices"]
    assert choice["index"] == 0
    assert choice["turns"] == ["first answer", "second answer"]
    assert choice["new_tokens"] == [7, 4]
    assert choice["decoding_steps"] == [3, 2]
    assert choice["accept_lengths"] == [1, 2, 4, 3, 1]  # one flat list over the turns
    step = sum(PHASE_TIMES.values())
    assert choice["wall_time"] == pytest.approx([2.5 * 3 * step / (5 * step + 0.005),
                                                 2.5 * (2 * step + 0.005) / (5 * step + 0.005)])
    assert sum(choice["wall_time"]) == pytest.approx(2.5, abs=1e-12)


def test_question_ids_keep_the_question_files_types_and_order(tmp_path):
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q, "category": c, "turns": ["hi"]}) + "\n"
                                 for q, c in ((10, "math"), (2, "math"), (1, "code"), (3, "code"))))
    run = speed_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "suite": str(questions)}))
    export(run, tmp_path / "out")
    for path in files(tmp_path / "out").values():
        assert [x["question_id"] for x in read_answers(path)] == [1, 2, 3, 10]  # integers, sorted as such
    moved = tmp_path / "moved.jsonl"
    questions.rename(moved)
    with pytest.raises(UserError, match="pass --questions FILE"):
        export(run, tmp_path / "out2")
    export(run, tmp_path / "out2", "--questions", str(moved))
    assert read_answers(tmp_path / "out2" / "target-1b-ar.jsonl")[0]["question_id"] == 1
    moved.write_text(json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n")
    with pytest.raises(UserError, match="prompt 10 .* is not in the run's question file"):
        export(run, tmp_path / "out3", "--questions", str(moved))


def test_one_drafter_to_one_file(tmp_path, capsys):
    run = speed_run(tmp_path / "run")
    assert export(run, tmp_path / "eagle.jsonl", "--drafter", "eagle") == 0
    assert {x["model_id"] for x in read_answers(tmp_path / "eagle.jsonl")} == {"target-1b-eagle"}
    with pytest.raises(UserError, match="one file, for one method, but 2 are selected"):
        export(run, tmp_path / "both.jsonl")
    with pytest.raises(UserError, match="--drafter nope: .* has answers of ar, eagle only"):
        export(run, tmp_path / "x", "--drafter", "nope")
    capsys.readouterr()
    export(run, tmp_path / "all")
    printed = capsys.readouterr().out
    assert "--file-path " + str(tmp_path / "all" / "target-1b-eagle.jsonl") in printed
    assert "--base-path " + str(tmp_path / "all" / "target-1b-ar.jsonl") in printed


# ----------------------------------------------------------------------------- Spec-Bench's figures

@pytest.mark.parametrize("task, category", [("overall", "all"), ("math", "math"), ("code", "code")])
def test_specbench_reader_gives_our_figures(tmp_path, task, category):
    """Equal wall times within each drafter: Spec-Bench's mean of per-answer rates equals our ratio of sums."""
    run = speed_run(tmp_path / "run")
    export(run, tmp_path / "out")
    f = files(tmp_path / "out")
    theirs = specbench_speed(f["target-1b-eagle"], f["target-1b-ar"], words, task)
    df = summarize(run)
    eagle, ar = row(df, "eagle", category), row(df, "ar", category)
    assert theirs["mean_accepted"] == pytest.approx(eagle["tau"], rel=1e-12)
    assert theirs["tok_s"] == pytest.approx(eagle["tok_s"], rel=1e-12)
    assert theirs["base_tok_s"] == pytest.approx(ar["tok_s"], rel=1e-12)
    assert theirs["speedup"] == pytest.approx(eagle["speedup"], rel=1e-12)
    assert specbench_speed(f["target-1b-ar"], f["target-1b-ar"], words, task)["mean_accepted"] == 1.0


def test_specbench_tok_s_is_the_mean_of_answer_rates(tmp_path):
    run = speed_run(tmp_path / "run", ar_wall=(1.0, 2.0, 3.0, 0.5), eagle_wall=(0.2, 0.9, 0.4, 0.3))
    export(run, tmp_path / "out")
    f = files(tmp_path / "out")
    theirs = specbench_speed(f["target-1b-eagle"], f["target-1b-ar"], words)
    recs = [r for r in read_jsonl(run / "prompts.jsonl") if r["drafter"] == "eagle"]
    assert theirs["tok_s"] == pytest.approx(np.mean([r["new_tokens"] / r["wall_s"] for r in recs]), rel=1e-12)
    assert theirs["mean_accepted"] == pytest.approx(row(summarize(run), "eagle", "all")["tau"], rel=1e-12)


def test_the_equality_script_sees_equal_answers(tmp_path):
    run = speed_run(tmp_path / "run")
    export(run, tmp_path / "out")
    f = files(tmp_path / "out")
    assert specbench_equal(f["target-1b-ar"], f["target-1b-eagle"])
    lines = f["target-1b-eagle"].read_text().splitlines()
    changed = json.loads(lines[1])
    changed["choices"][0]["turns"][0] += " extra"
    f["target-1b-eagle"].write_text("\n".join([lines[0], json.dumps(changed), *lines[2:]]) + "\n")
    assert not specbench_equal(f["target-1b-ar"], f["target-1b-eagle"])


# ----------------------------------------------------------------------------- importing back

def test_round_trip_gives_same_tok_s_and_tau(tmp_path):
    run = basic_run(tmp_path / "run")
    export(run, tmp_path / "out")
    f = files(tmp_path / "out")
    assert {k: len(read_answers(v)) for k, v in f.items()} == {"target-1b-ar": 3, "target-1b-eagle": 4}
    df = summarize(run)
    for drafter in ("ar", "eagle"):
        back = specbench.import_specbench(f[f"target-1b-{drafter}"], f"ext-{drafter}")
        mine = row(df, drafter, "all")
        assert back["tok_s"] == pytest.approx(mine["tok_s"], rel=1e-12)
        assert back["tau"] == pytest.approx(mine["tau"], rel=1e-12)
        assert back["prompts"] == mine["prompts"] and back["steps"] == mine["steps"]
        assert back["tok_s_lo"] == pytest.approx(mine["tok_s_lo"])
        assert back["drafter"] == f"ext-{drafter}" and back["model_id"] == f"target-1b-{drafter}"


def test_round_trip_two_turns(tmp_path):
    export(two_turn_run(tmp_path / "run"), tmp_path / "a")
    back = specbench.import_specbench(tmp_path / "a" / "tiny-target-eagle.jsonl", "x")
    assert back["tok_s"] == pytest.approx(11 / 2.5) and back["tau"] == pytest.approx(11 / 5)


def test_import_reads_older_per_turn_accept_lengths(tmp_path):
    f = tmp_path / "old.jsonl"
    f.write_text(json.dumps({"question_id": "q", "model_id": "m", "choices": [
        {"turns": ["a", "b"], "new_tokens": [3, 4], "wall_time": [1.0, 1.0], "accept_lengths": [[1, 2], [4]]}]}) + "\n")
    assert specbench.import_specbench(f, "old")["tau"] == pytest.approx(7 / 3)


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
    export(run, tmp_path / "out")
    both = tmp_path / "both.jsonl"
    both.write_text("".join(p.read_text() for p in files(tmp_path / "out").values()))
    with pytest.raises(UserError, match="several models"):
        specbench.import_specbench(both, "x")
    with pytest.raises(UserError, match="no model_id"):
        specbench.import_specbench(both, "x", "nope")
    assert specbench.import_specbench(both, "x", "target-1b-eagle")["prompts"] == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(UserError, match="not a Spec-Bench answer line"):
        specbench.import_specbench(bad, "x")
    with pytest.raises(UserError):
        specbench.import_specbench(tmp_path / "missing.jsonl", "x")


def test_report_external_row(tmp_path, capsys):
    run = basic_run(tmp_path / "run")
    export(run, tmp_path / "out")
    parser = argparse.ArgumentParser(prog="spec-harness")
    report.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run), "--external", f"{tmp_path / 'out' / 'target-1b-eagle.jsonl'}:theirs"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("| theirs"))
    eagle = row(summarize(run), "eagle", "all")
    assert f"{eagle['tok_s']:.1f} [" in line and f"{eagle['tau']:.2f} [" in line
    assert "External row `theirs`" in (run / "report.md").read_text()


# ----------------------------------------------------------------------------- a real run

def test_real_run_exports_what_specbench_reads(tiny_dir, tmp_path):
    """A run of the tiny model on a question file with integer ids, exported and read as Spec-Bench does."""
    from harness.cli import main

    questions = tmp_path / "question.jsonl"
    rows = [{"question_id": 7, "category": "qa", "turns": ["abc abc abc abc abc", "again: abc abc abc"]},
            {"question_id": 3, "category": "qa", "turns": ["the cat the cat the cat"]}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["run", "--target", str(tiny_dir), "--prompts", str(questions), "--drafters", "ar,ngram",
                 "--max-new-tokens", "10", "--k", "3", "--meter", "off", "--out", str(tmp_path), "--run-id", "r",
                 "--device", "cpu", "--warmup", "0"]) == 0
    run = tmp_path / "r"
    assert main(["export-specbench", str(run), "--out", str(tmp_path / "answers")]) == 0
    f = files(tmp_path / "answers")
    model = Path(str(tiny_dir)).name
    assert set(f) == {f"{model}-ar", f"{model}-ngram"}
    ngram = read_answers(f[f"{model}-ngram"])
    assert [x["question_id"] for x in ngram] == [3, 7]
    assert [len(x["choices"][0]["turns"]) for x in ngram] == [1, 2]
    df = summarize(run)
    theirs = specbench_speed(f[f"{model}-ngram"], f[f"{model}-ar"], words)
    assert theirs["mean_accepted"] == pytest.approx(row(df, "ngram", "all")["tau"], rel=1e-12)
    recs = [r for r in read_jsonl(run / "prompts.jsonl") if r["drafter"] == "ngram"]
    assert theirs["tok_s"] == pytest.approx(np.mean([r["new_tokens"] / r["wall_s"] for r in recs]), rel=1e-12)
    assert specbench_equal(f[f"{model}-ar"], f[f"{model}-ngram"])  # lossless at temperature 0
