"""Spec-Bench / FastChat answer files: export a run's answers, import another tool's as a table row.

One JSON line per (drafter, prompt):
  {"question_id": <prompt_id>, "answer_id": "<drafter>:<prompt_id>", "model_id": "<target>-<drafter>",
   "category": ..., "choices": [{"index": 0, "turns": [text per turn], "new_tokens": [per turn],
   "wall_time": [s per turn], "decoding_steps": [target forwards per turn],
   "accept_lengths": [[tokens emitted by each step of the turn] per turn]}]}

<target> is the last path part of config.json "target"; a run with several batch sizes appends
"-bs<N>" to model_id. accept_lengths count the bonus or recovered token (as Spec-Bench does), so
their mean is tau. prompts.jsonl records only a prompt's total wall time: it is split over the
turns in proportion to their step time, so the per-turn times add up to the total exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import UserError
from harness.records import JsonlWriter
from harness.reports.summary import PHASES, bootstrap_ci, load_records


def _model_name(run_dir: Path) -> str:
    from harness.records import run_info

    target = run_info(run_dir)["target"]
    return target.rstrip("/").split("/")[-1] or "target"


def answer_records(run_dir: Path) -> list[dict]:
    """The Spec-Bench answer records of a run folder's finished prompts."""
    run_dir = Path(run_dir)
    prompts, steps = load_records(run_dir)
    model = _model_name(run_dir)
    several_batches = prompts["batch_size"].nunique() > 1
    steps = steps.assign(t_step=steps[list(PHASES)].sum(axis=1))
    by_row = {row: g for row, g in steps.groupby("row")}
    out = []
    for i, p in enumerate(prompts.to_dict("records")):  # native Python values, JSON-ready
        s = by_row.get(i, steps.iloc[0:0]).sort_values(["turn", "step"], kind="stable")
        texts = p.get("turns") if isinstance(p.get("turns"), list) else []
        n_turns = max(len(texts), int(s["turn"].max()) + 1 if len(s) else 0, 1)
        accept = [s.loc[s["turn"] == t, "emitted"].astype(int).tolist() for t in range(n_turns)]
        model_id = f"{model}-{p['drafter']}" + (f"-bs{p['batch_size']}" if several_batches else "")
        out.append({
            "question_id": p["prompt_id"],
            "answer_id": f"{p['drafter']}:{p['prompt_id']}",
            "model_id": model_id,
            "category": p["category"],
            "choices": [{
                "index": 0,
                "turns": [str(t) for t in texts] + [""] * (n_turns - len(texts)),
                "new_tokens": _turn_tokens(p, accept),
                "wall_time": _turn_times(float(p["wall_s"]), s, n_turns),
                "decoding_steps": [len(a) for a in accept],
                "accept_lengths": accept,
            }],
        })
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


def _turn_times(wall: float, steps: pd.DataFrame, n_turns: int) -> list[float]:
    weights = np.array([steps.loc[steps["turn"] == t, "t_step"].sum() for t in range(n_turns)], dtype=float)
    if weights.sum() <= 0:
        weights = np.array([(steps["turn"] == t).sum() for t in range(n_turns)], dtype=float)
    if weights.sum() <= 0:
        weights = np.ones(n_turns)
    times = list(wall * weights / weights.sum())
    times[-1] = wall - sum(times[:-1])  # exact total
    return times


def export_specbench(run_dir: Path, out: Path) -> int:
    """Writes the answer file; returns the number of lines."""
    records = answer_records(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    writer = JsonlWriter(out)
    writer.write_many(records)
    writer.close()
    return len(records)


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
        emitted = np.array([float(sum(sum(turn) for turn in c["accept_lengths"])) for c in choices])
        nsteps = np.array([float(sum(len(turn) for turn in c["accept_lengths"])) for c in choices])
    else:
        emitted, nsteps = nt, np.array([total(c, "decoding_steps") for c in choices])
    tok_lo, tok_hi = bootstrap_ci([nt, wall], _ratio)
    tau_lo, tau_hi = bootstrap_ci([emitted, nsteps], _ratio)
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
                              help="write a run's answers in the Spec-Bench / FastChat answer format")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the .jsonl answer file to write")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    n = export_specbench(args.run_dir, args.out)
    print(f"wrote {n} answers to {args.out}")
    return 0
