"""The prompt files for tuning the suffix drafter and the shipped corpus of SmolLM2's own answers.

    python benchmarks/suffix_corpus.py prompts --out DIR   # tune.jsonl (mini 3-6), corpus.jsonl (7-10, calibration)
    python benchmarks/suffix_corpus.py corpus RUN [RUN ...]  # ar's answers -> harness/suites/suffix_corpus_smollm2.jsonl

No prompt of either file is one the bench presets measure (mini prompts 1-2 of each category).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from importlib import resources
from pathlib import Path

from harness.records import read_jsonl

SHIPPED = Path(__file__).resolve().parents[1] / "harness" / "suites" / "suffix_corpus_smollm2.jsonl"


def suite_lines(name: str) -> list[dict]:
    text = resources.files("harness.suites").joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def by_rank(questions: list[dict], lo: int, hi: int) -> list[dict]:
    """The questions whose rank within their category (1-based, file order) is in lo..hi."""
    seen, out = Counter(), []
    for q in questions:
        seen[q["category"]] += 1
        if lo <= seen[q["category"]] <= hi:
            out.append(q)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("corpus")
    c.add_argument("runs", type=Path, nargs="+", help="run folders with ar's records")
    c.add_argument("--out", type=Path, default=SHIPPED)
    args = ap.parse_args()
    if args.cmd == "prompts":
        mini = suite_lines("mini")
        args.out.mkdir(parents=True, exist_ok=True)
        cal = [dict(q, question_id=f"cal-{q['question_id']}") for q in suite_lines("calibration")]
        for name, qs in (("tune", by_rank(mini, 3, 6)), ("corpus", by_rank(mini, 7, 10) + cal)):
            (args.out / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
            print(f"{args.out / name}.jsonl: {len(qs)} prompts")
        return
    docs = []
    for run in args.runs:
        for rec in read_jsonl(run / "prompts.jsonl"):
            if rec["drafter"] == "ar":
                pid = str(rec["prompt_id"])
                if pid.startswith("mini/") and int(pid.rsplit("/", 1)[1]) <= 2:
                    raise SystemExit(f"{run}: {pid} is a prompt the bench presets measure; keep it out of the corpus")
                docs += [dict(prompt_id=rec["prompt_id"], text=t) for t in rec["turns"]]
    args.out.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    print(f"{args.out}: {len(docs)} answers")


if __name__ == "__main__":
    main()
