"""The command line end to end on a tiny model: the run folder, resume, and one-line errors for user
mistakes (non-zero exit, no traceback)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from harness.records import read_jsonl


def spec(*args, cwd="/tmp"):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "questions.jsonl"
    rows = [
        {"question_id": 1, "category": "qa", "turns": ["The quick brown fox jumps. Repeat: the quick brown fox"]},
        {"question_id": 2, "category": "chat", "turns": ["Say hello.", "Now say it again."]},
        {"question_id": 3, "category": "qa", "turns": ["abc abc abc abc"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_run_writes_the_run_folder_and_resume_skips_finished(tiny_dir, prompts_file, tmp_path):
    args = ["run", "--target", str(tiny_dir), "--prompts", str(prompts_file), "--drafters", "ar,ngram,layerskip",
            "--max-new-tokens", "12", "--k", "3", "--out", str(tmp_path), "--run-id", "r", "--meter", "off",
            "--layerskip-layers", "2"]
    res = spec(*args)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "r"
    for name in ("steps.jsonl", "prompts.jsonl", "summary.csv", "summary.md", "env.json", "config.json"):
        assert (run / name).is_file(), name
    env = json.loads((run / "env.json").read_text())
    for key in ("device", "python", "torch", "transformers", "triton", "dtype", "seed", "git_commit", "command"):
        assert key in env
    prompts = list(read_jsonl(run / "prompts.jsonl"))
    assert len(prompts) == 9  # 3 prompts x 3 drafters
    ar = {p["prompt_id"]: p["output_ids"] for p in prompts if p["drafter"] == "ar"}
    for p in prompts:
        if p["drafter"] != "ar":
            assert p["output_ids"] == ar[p["prompt_id"]]  # lossless at temperature 0 in fp32
            assert p["diverged"] is False
    two_turns = [p for p in prompts if p["prompt_id"] == "2"][0]
    assert len(two_turns["turns"]) == 2
    rows = list(csv.DictReader(open(run / "summary.csv")))
    cols = {"drafter", "suite", "category", "prompts", "new_tokens", "wall_s", "tok_s", "tau", "accept_rate",
            "speedup", "diverged"}
    assert cols <= set(rows[0])
    assert {r["category"] for r in rows} == {"qa", "chat", "all"}
    # simulate an interruption: drop the last prompt record and add a half-written step line
    lines = (run / "prompts.jsonl").read_text().splitlines()
    kept = lines[:-1]
    (run / "prompts.jsonl").write_text("\n".join(kept) + "\n")
    with open(run / "steps.jsonl", "a") as fh:
        fh.write('{"drafter": "ar", "prompt_id"')
    res = spec(*args)
    assert res.returncode == 2 and "--resume" in res.stderr
    res = spec(*args, "--resume")
    assert res.returncode == 0, res.stderr
    prompts = list(read_jsonl(run / "prompts.jsonl"))
    assert len(prompts) == 9
    assert len({(p["drafter"], p["prompt_id"]) for p in prompts}) == 9


@pytest.mark.parametrize("args, message", [
    (["run", "--target", "nope-model"], "unknown target"),
    (["run", "--drafters", "ar,magic"], "unknown drafter 'magic'"),
    (["run", "--suite", "nosuch"], "unknown suite"),
    (["run", "--prompts", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["run", "--k", "0"], "--k must be between 1 and 64"),
    (["run", "--k", "65"], "--k must be between 1 and 64"),
    (["run", "--temperature", "-1"], "--temperature must be >= 0"),
    (["run", "--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
    (["run", "--drafters", "ar,eagle3:kk=3"], "'kk=3' is not KEY=VALUE"),
    (["run", "--drafters", "ar,eagle3:k=x"], "k must be an integer, got 'x'"),
    (["run", "--drafters", "ar,eagle3:k=0"], "k must be between 1 and 64"),
    (["run", "--drafters", "ar:k=3"], "ar takes no settings"),
    (["run", "--drafters", "ar,ngram,ngram"], "a drafter is named twice"),
])
def test_user_errors_are_one_line(args, message):
    res = spec(*args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_malformed_prompts_line_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "turns": "oops"}\n')
    res = spec("run", "--prompts", str(bad))
    assert res.returncode == 2 and "bad.jsonl:2" in res.stderr and "turns" in res.stderr
    assert "Traceback" not in res.stderr


def test_model_folder_without_tokenizer_is_refused(tmp_path, tiny_dir):
    folder = tmp_path / "notok"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    res = spec("run", "--target", str(folder), "--suite", "mini", "--limit", "1")
    assert res.returncode == 2 and "no tokenizer" in res.stderr
    assert "Traceback" not in res.stderr


def test_list_names_targets_drafters_suites():
    res = spec("list")
    assert res.returncode == 0
    for name in ("smollm2-135m", "gemma3-270m", "ngram", "layerskip", "eagle", "eagle3", "block", "mini", "humaneval",
                 "mt-bench"):
        assert name in res.stdout


def test_drafter_settings_run_side_by_side(tiny_dir, prompts_file, tmp_path):
    """ngram:k=1 and ngram:k=4 in one run: each decodes with its own K (no step drafts more than it), both
    equal ar at T = 0, and each is its own row of the summary."""
    res = spec("run", "--target", str(tiny_dir), "--prompts", str(prompts_file), "--drafters",
               "ar,ngram:k=1,ngram:k=4", "--max-new-tokens", "16", "--k", "2", "--out", str(tmp_path),
               "--run-id", "v", "--meter", "off")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "v"
    steps = list(read_jsonl(run / "steps.jsonl"))
    drafted = {name: max(s["drafted"] for s in steps if s["drafter"] == name) for name in ("ngram:k=1", "ngram:k=4")}
    assert drafted["ngram:k=1"] == 1 and drafted["ngram:k=4"] > 2, drafted
    prompts = list(read_jsonl(run / "prompts.jsonl"))
    ar = {p["prompt_id"]: p["output_ids"] for p in prompts if p["drafter"] == "ar"}
    for p in prompts:
        assert p["output_ids"] == ar[p["prompt_id"]], p["drafter"]
    rows = {r["drafter"] for r in csv.DictReader(open(run / "summary.csv"))}
    assert rows == {"ar", "ngram:k=1", "ngram:k=4"}
