"""Per-turn figures of a run (MT-bench's first and second turns apart), rebuilt from its steps.jsonl.

    python benchmarks/turns.py results/<run>      # prints the table, writes turns.csv / turns.md in the run

Per drafter and turn (1-based): steps, emitted tokens, tau = emitted / steps (bonus or recovered token
included), tok/s = emitted / the summed step time (draft + verify + accept + other; prefill excluded), and
the tok/s ratio to `ar` on the same turn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def per_turn(run: Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    df["t_step"] = df[["t_draft", "t_verify", "t_accept", "t_other"]].sum(axis=1)
    g = df.groupby(["drafter", "turn"]).agg(steps=("emitted", "size"), emitted=("emitted", "sum"),
                                            time_s=("t_step", "sum")).reset_index()
    g["turn"] = g["turn"] + 1
    g["tau"] = g["emitted"] / g["steps"]
    g["tok_s"] = g["emitted"] / g["time_s"]
    ar = g[g["drafter"] == "ar"].set_index("turn")["tok_s"]
    g["speedup"] = g.apply(lambda r: r["tok_s"] / ar.get(r["turn"], float("nan")), axis=1)
    return g.round(3)


def markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder (with steps.jsonl)")
    run = Path(p.parse_args().run)
    g = per_turn(run)
    g.to_csv(run / "turns.csv", index=False)
    (run / "turns.md").write_text(markdown(g) + "\n")
    print(markdown(g))


if __name__ == "__main__":
    main()
