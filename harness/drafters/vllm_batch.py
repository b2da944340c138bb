"""vLLM peers at `--batch-size B > 1`: vLLM gets the batch (max_num_seqs = B) and schedules it itself.

Turns go in rounds: round t hands vLLM turn t of every prompt that has one (its context holds the answers
of earlier rounds), all in one generate call; vLLM runs up to B of them at once and starts the next as
one finishes. Records as at batch 1 (harness.drafters.vllm_peer), with batch_size = B: per prompt wall_s
sums, over its turns, the time from the round's start to the turn's end (waiting for a free slot
included), so the throughput figure of a batched run is batch_runs.jsonl's tok_s_total = all new tokens
/ the rounds' wall time, as for harness.engine.scheduler.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from harness.drafters.vllm_peer import add_counters, step_records
from harness.records import JsonlWriter

BATCH_RUNS = "batch_runs.jsonl"  # the file harness.engine.scheduler writes too


def run_vllm_batched(cfg, target, peers: dict, prompts: list, done: set, ar_out: dict, eos: set[int], out: Path,
                     rank: int = 0) -> None:
    from harness.targets.chat import prompt_ids

    B = cfg.batch_size
    steps_w, prompts_w = JsonlWriter(out / "steps.jsonl"), JsonlWriter(out / "prompts.jsonl")
    runs_w = JsonlWriter(out / BATCH_RUNS)
    try:
        for name, peer in peers.items():
            todo = [p for p in prompts if (name, p.prompt_id) not in done]
            if not todo:
                continue
            state = {p.prompt_id: dict(messages=[], outputs=[], turns=[], steps=[], prompt_tokens=0, wall_s=0.0,
                                       forwards=0, cut_tokens=0, vllm_counters=None) for p in todo}
            total_wall, rounds, runs_counters = 0.0, max(len(p.turns) for p in todo), None
            bar = tqdm(total=sum(len(p.turns) for p in todo), desc=f"{name} B={B}", unit="turn", dynamic_ncols=True)
            for t in range(rounds):
                live = [p for p in todo if t < len(p.turns)]
                requests = []
                for p in live:
                    s = state[p.prompt_id]
                    s["messages"].append({"role": "user", "content": p.turns[t]})
                    ids = prompt_ids(target.tokenizer, s["messages"])
                    s["prompt_tokens"] += len(ids)
                    requests.append(dict(prompt_ids=ids, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         stop_ids=sorted(eos), seed=cfg.seed))
                reply = peer.generate_many(requests)
                total_wall += reply["wall_s"]
                for p, res in zip(live, reply["results"]):
                    s = state[p.prompt_id]
                    steps = step_records(res["emitted"], res["step_accepted"], res["step_drafted"], res.get("step_s"))
                    for i, rec in enumerate(steps):
                        rec.update(turn=t, step=i)
                    s["steps"].extend(steps)
                    s["wall_s"] += res["wall_s"]
                    s["forwards"] += len(steps)
                    s["cut_tokens"] += sum(x["accepted"] + 1 - x["emitted"] for x in steps[-1:])
                    answer = target.tokenizer.decode(res["output_ids"], skip_special_tokens=True)
                    s["messages"].append({"role": "assistant", "content": answer})
                    s["turns"].append(answer)
                    s["outputs"].append(list(res["output_ids"]))
                # the counters cover every request of the round together: kept per run, not per prompt
                runs_counters = add_counters(runs_counters, reply["counters"])
                bar.update(len(live))
            bar.close()
            new_tokens = 0
            for p in todo:
                s = state[p.prompt_id]
                base = dict(drafter=name, prompt_id=p.prompt_id, category=p.category, suite=p.suite, rank=rank,
                            batch_size=B)
                steps_w.write_many({**base, **r} for r in s["steps"])
                n_new = sum(len(o) for o in s["outputs"])
                new_tokens += n_new
                diverged = s["outputs"] != ar_out[p.prompt_id] if p.prompt_id in ar_out else None
                prompts_w.write({**base, "prompt_tokens": s["prompt_tokens"], "new_tokens": n_new,
                                 "wall_s": s["wall_s"], "turns": s["turns"], "output_ids": s["outputs"],
                                 "steps": len(s["steps"]), "drafted": sum(r["drafted"] for r in s["steps"]),
                                 "accepted": sum(r["accepted"] for r in s["steps"]), "forwards": s["forwards"],
                                 "cut_tokens": s["cut_tokens"], "diverged": diverged})
            runs_w.write(dict(drafter=name, suite=cfg.suite, batch_size=B, k=cfg.k, k_auto=False, prompts=len(todo),
                              new_tokens=new_tokens, wall_s=total_wall,
                              tok_s_total=new_tokens / total_wall if total_wall else float("nan"),
                              vllm_counters=runs_counters))
    finally:
        for w in (steps_w, prompts_w, runs_w):
            w.close()
