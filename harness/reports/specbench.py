"""Spec-Bench answer files: export a run's answers in Spec-Bench's layout, import such a file as a table row.

Spec-Bench (hemingkx/Spec-Bench) writes one answer file per method, `<model_id>.jsonl`, one JSON line
per question, sorted by question_id; its evaluation/speed.py reads a method's file against the
baseline's file and evaluation/equal.py compares two files' answers line by line. We write the same:

  {"question_id": <as typed in the question file>, "category": ..., "answer_id": "<drafter>:<prompt_id>",
   "model_id": "<target>-<drafter>", "choices": [{"index": 0, "turns": [answer text per turn],
   "decoding_steps": [target forwards per turn], "new_tokens": [per turn], "wall_time": [s per turn],
   "accept_lengths": [tokens emitted by each step, all turns in order, one flat list]}],
   "tstamp": <unix time the run started>}

- <target> is the last path part of config.json "target"; a run with several batch sizes appends
  "-bs<N>" to model_id (one file per drafter and batch size).
- accept_lengths count the bonus or recovered token, as Spec-Bench's do, so their mean over a file
  ("#Mean accepted tokens" in speed.py) is our tau.
- question_id takes the type the question file gave it (an integer stays an integer): the question
  file is the run's suite (config.json "suite"), or `--questions FILE` when it moved.
- prompts.jsonl records only a prompt's total wall time: it is split over the turns in proportion to
  their step time (peers, which have no steps: to their new tokens), so the turns add up to the total.
  Peers (transformers' generate) have no step records: their decoding_steps and accept_lengths are [].
- tstamp: Spec-Bench stamps each answer when written; we record no per-prompt time, so every line
  carries the run's start (env.json "time"; prompts.jsonl's modification time without it).

speed.py's figures differ from ours by definition, not by data: its tokens/s is the mean over answers of
sum(new_tokens) / sum(wall_time) (ours: all tokens / all time), and it counts the baseline's tokens
by re-tokenizing the answer text. tests/test_specbench.py reads our files the way speed.py does.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import UserError
from harness.records import check_out_dir, check_out_file
from harness.reports.summary import PHASES, bootstrap_ci, load_records


def _model_name(run_dir: Path) -> str:
    from harness.records import run_info

    target = run_info(run_dir)["target"]
    return target.rstrip("/").split("/")[-1] or "target"


def _question_ids(run_dir: Path, questions: Path | None) -> dict[str, int | str] | None:
    """prompt_id -> question_id as the question file typed it; None when the run names no suite."""
    from harness.records import _read_json
    from harness.suites import load_suite

    source = questions if questions is not None else _read_json(run_dir / "config.json").get("suite")
    if source is None:
        return None
    try:
        prompts = load_suite(str(source))
    except UserError as err:
        raise UserError(f"question ids keep the types of the run's question file, which cannot be read ({err}); "
                        "pass --questions FILE") from None
    return {p.prompt_id: p.prompt_id if p.question_id is None else p.question_id for p in prompts}


def _run_start(run_dir: Path) -> float:
    from harness.records import _read_json

    started = _read_json(run_dir / "env.json").get("time")
    if isinstance(started, str):
        try:
            return datetime.fromisoformat(started).timestamp()
        except ValueError:
            pass
    return os.path.getmtime(run_dir / "prompts.jsonl")


def _id_order(qid: int | str) -> tuple[int, int | str]:
    return (0, qid) if isinstance(qid, int) else (1, str(qid))


@dataclass
class Method:
    """One Spec-Bench answer file: a drafter (at one batch size) and its answer lines."""

    model_id: str
    drafter: str
    lines: list[dict] = field(default_factory=list)


def answer_records(run_dir: Path, questions: Path | None = None, drafters: list[str] = ()) -> dict[str, Method]:
    """model_id -> the method's answer lines for its finished prompts, sorted by question_id.
    drafters: only these (default every drafter of the run)."""
    run_dir = Path(run_dir)
    prompts, steps = load_records(run_dir)
    ran = list(dict.fromkeys(prompts["drafter"]))
    unknown = [d for d in drafters if d not in ran]
    if unknown:
        raise UserError(f"--drafter {', '.join(unknown)}: {run_dir} has answers of {', '.join(ran)} only")
    model = _model_name(run_dir)
    typed = _question_ids(run_dir, questions)
    tstamp = _run_start(run_dir)
    several_batches = prompts["batch_size"].nunique() > 1
    steps = steps.assign(t_step=steps[list(PHASES)].sum(axis=1))
    by_row = {row: g for row, g in steps.groupby("row")}
    out: dict[str, Method] = {}
    for i, p in enumerate(prompts.to_dict("records")):  # native Python values, JSON-ready
        if drafters and p["drafter"] not in drafters:
            continue
        pid = str(p["prompt_id"])
        if typed is not None and pid not in typed:
            raise UserError(f"prompt {pid} of {run_dir} is not in the run's question file: pass the file the run "
                            "asked with --questions FILE")
        s = by_row.get(i, steps.iloc[0:0]).sort_values(["turn", "step"], kind="stable")
        texts = p.get("turns") if isinstance(p.get("turns"), list) else []
        n_turns = max(len(texts), int(s["turn"].max()) + 1 if len(s) else 0, 1)
        accept = [s.loc[s["turn"] == t, "emitted"].astype(int).tolist() for t in range(n_turns)]
        new_tokens = _turn_tokens(p, accept)
        model_id = f"{model}-{p['drafter']}" + (f"-bs{p['batch_size']}" if several_batches else "")
        out.setdefault(model_id, Method(model_id, p["drafter"])).lines.append({
            "question_id": typed[pid] if typed is not None else p["prompt_id"],
            "category": p["category"],
            "answer_id": f"{p['drafter']}:{pid}",
            "model_id": model_id,
            "choices": [{
                "index": 0,
                "turns": [str(t) for t in texts] + [""] * (n_turns - len(texts)),
                "decoding_steps": [len(a) for a in accept] if len(s) else [],
                "new_tokens": new_tokens,
                "wall_time": _turn_times(float(p["wall_s"]), s, new_tokens),
                "accept_lengths": [n for a in accept for n in a],
            }],
            "tstamp": tstamp,
        })
    for method in out.values():
        method.lines.sort(key=lambda rec: _id_order(rec["question_id"]))
    return out


def _turn_tokens(p: dict, accept: list[list[int]]) -> list[int]:
    """New tokens per turn: output_ids lengths when recorded, else emitted tokens; the last turn
    absorbs any difference so the turns add up to the prompt's new_tokens."""
    ids = p.get("output_ids")
    if isinstance(ids, list) and len(ids) == len(accept) and all(isinstance(t, list) for t in ids):
        counts = [len(t) for t in ids]
    else:
        counts = [sum(a) for a in accept]
    counts[-1] = max(0, counts[-1] + int(p["new_tokens"]) - sum(counts))
    return counts


def _turn_times(wall: float, steps: pd.DataFrame, new_tokens: list[int]) -> list[float]:
    n_turns = len(new_tokens)
    weights = np.array([steps.loc[steps["turn"] == t, "t_step"].sum() for t in range(n_turns)], dtype=float)
    if weights.sum() <= 0:
        weights = np.array(new_tokens, dtype=float)
    if weights.sum() <= 0:
        weights = np.ones(n_turns)
    times = list(wall * weights / weights.sum())
    times[-1] = wall - sum(times[:-1])  # exact total
    return times


def export_specbench(run_dir: Path, out: Path, drafters: list[str] = (),
                     questions: Path | None = None) -> dict[Path, Method]:
    """Writes one Spec-Bench answer file per method: `out/<model_id>.jsonl`, or the file `out` itself
    when it ends in .jsonl and one method is selected. drafters: only these (default every one).
    Returns {file: the method written there}."""
    out = Path(out)
    single = out.suffix == ".jsonl"
    if single:
        check_out_file(out)
    else:
        check_out_dir(out)
    methods = answer_records(run_dir, questions, drafters)
    if single and len(methods) != 1:
        raise UserError(f"--out {out} is one file, for one method, but {len(methods)} are selected "
                        f"({', '.join(methods)}): pass --drafter NAME, or a folder for one file per method")
    written = {}
    for method in methods.values():
        path = out if single else out / f"{method.model_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(rec) + "\n" for rec in method.lines)
        written[path] = method
    return written


def _flat(values: list) -> list[float]:
    """accept_lengths as one flat list: Spec-Bench's layout, or the per-turn lists of older exports."""
    return [float(x) for v in values for x in (v if isinstance(v, list) else [v])]


def import_specbench(path: Path, name: str, model_id: str | None = None) -> dict:
    """One summary-table row (category "all") for the answers of one model in a Spec-Bench file:
    tok_s = sum new_tokens / sum wall_time, tau = mean of accept_lengths over all steps (or
    new_tokens / decoding_steps when a file has no accept_lengths), with bootstrap intervals over
    questions. Pass model_id when the file holds several models."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such Spec-Bench answer file")
    by_model: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                choice = rec["choices"][0]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                raise UserError(f"{path}:{n} is not a Spec-Bench answer line (JSON with choices[0]); "
                                "pass an answer file written by Spec-Bench or export-specbench") from None
            by_model.setdefault(str(rec.get("model_id", "")), []).append(choice)
    if not by_model:
        raise UserError(f"{path} holds no answers")
    if model_id is None:
        if len(by_model) > 1:
            raise UserError(f"{path} holds several models ({', '.join(sorted(by_model))}); "
                            "pass FILE:NAME:MODEL_ID to pick one")
        model_id = next(iter(by_model))
    if model_id not in by_model:
        raise UserError(f"{path} has no model_id {model_id!r}; it has {', '.join(sorted(by_model))}")
    choices = by_model[model_id]

    def total(choice: dict, key: str) -> float:
        values = choice.get(key)
        if not isinstance(values, list):
            raise UserError(f"{path}: an answer of {model_id} lacks the list `{key}`")
        return float(sum(values))

    nt = np.array([total(c, "new_tokens") for c in choices])
    wall = np.array([total(c, "wall_time") for c in choices])
    if all(isinstance(c.get("accept_lengths"), list) for c in choices):
        emitted = np.array([sum(_flat(c["accept_lengths"])) for c in choices])
        nsteps = np.array([float(len(_flat(c["accept_lengths"]))) for c in choices])
    else:
        emitted, nsteps = nt, np.array([total(c, "decoding_steps") for c in choices])
    tok_lo, tok_hi = bootstrap_ci([nt, wall], _ratio)
    tau_lo, tau_hi = bootstrap_ci([emitted, nsteps], _ratio) if nsteps.sum() else (math.nan, math.nan)
    tau = emitted.sum() / nsteps.sum() if nsteps.sum() else math.nan
    return {
        "drafter": name, "suite": "external", "category": "all", "batch_size": math.nan,
        "prompts": len(choices), "new_tokens": int(nt.sum()), "wall_s": float(wall.sum()),
        "tok_s": nt.sum() / wall.sum() if wall.sum() else math.nan, "tok_s_lo": tok_lo, "tok_s_hi": tok_hi,
        "steps": int(nsteps.sum()), "tau": tau, "tau_lo": tau_lo, "tau_hi": tau_hi,
        "mean_accepted": tau - 1, "accept_rate": math.nan, "speedup": math.nan, "speedup_lo": math.nan,
        "speedup_hi": math.nan, "diverged": math.nan, "source": str(path), "model_id": model_id,
    }


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a / b


def register(subparsers) -> None:
    p = subparsers.add_parser("export-specbench",
                              help="write a run's answers as Spec-Bench answer files, one per method")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="DIR|FILE.jsonl",
                   help="folder for one <model_id>.jsonl per method, or one .jsonl file with --drafter")
    p.add_argument("--drafter", action="append", default=[], metavar="NAME",
                   help="export only this drafter's answers (repeatable; default every drafter)")
    p.add_argument("--questions", type=Path, default=None, metavar="FILE",
                   help="the run's question file, when it is no longer where the run read it (for id types)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    written = export_specbench(args.run_dir, args.out, args.drafter, args.questions)
    for path, method in written.items():
        print(f"wrote {len(method.lines)} answers of {method.drafter} to {path}")
    base = [p for p, m in written.items() if m.drafter == "ar"]
    others = [p for p, m in written.items() if m.drafter != "ar"]
    if base and others:
        print(f"Spec-Bench: python evaluation/speed.py --file-path {others[0]} --base-path {base[0]} "
              "--tokenizer-path <the target's tokenizer folder>")
    return 0
