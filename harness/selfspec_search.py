"""`spec-harness selfspec-search`: the set of layers the selfspec drafter skips, found on the calibration
prompts (see harness.drafters.selfspec).

The cost model (harness.calibrate) predicts each candidate's tok/s from its simulated acceptance and
measured forward and draft times; it picks each candidate's K and, with measure=False (tests, or a search
that cannot afford the decodes), the set. Otherwise every candidate is then decoded at its K and timed
against ar, and the chosen set is the one with the best measured tok/s among those timed (`choose_measured`):
the cost model ranks, the measurement decides. Each row of the result keeps both figures, and marks the
best predicted (`predicted_best`) and the chosen (`chosen`) row."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from harness.drafters.model import ARDraftModel
from harness.drafters.selfspec import skip_view
from harness.errors import UserError
from harness.targets.base import Target


@dataclass
class SearchConfig:
    prompts: int = 3  # calibration prompts (their first turns)
    max_new_tokens: int = 32  # per prompt, in the timed decodes (trajectories run k_max tokens further)
    k_max: int = 6  # largest K the cost model considers
    protect: int = 1  # the first and last `protect` layers are never skipped
    sizes: tuple[float, ...] = (0.07, 0.15, 0.25, 0.35)  # skip-set sizes as fractions of the layers
    repeats: int = 5  # timed calls per measured time (medians)
    warmup: int = 2
    context: int = 128  # cached tokens while timing forwards and drafts
    rounds: int = 2  # timed passes over ar and the candidates (the fastest kept)
    seed: int = 0


# ----------------------------------------------------------------------------- acceptance by simulation

def greedy_agreement(draft: ARDraftModel, seqs: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
    """Per (prompt, trajectory): [n] bool, element j = the draft model's greedy next token after prompt +
    trajectory[:j] equals trajectory[j] (one teacher-forced forward per sequence)."""
    out = []
    model = draft.model
    with torch.inference_mode():
        for prompt, traj in seqs:
            model.reset(1)
            ids = torch.tensor([prompt + traj[:-1]], dtype=torch.long, device=model.device)
            pred = model.forward(ids).logits[0, len(prompt) - 1:].argmax(-1).cpu()  # [n]
            out.append((pred == torch.tensor(traj)).numpy())
    return out


def simulate_chain(agree: np.ndarray, k: int, stop: int | None = None) -> list[tuple[int, int]]:
    """(accepted, judged) per step of greedy chain decoding with K = k along a trajectory whose first token
    came from the prefill (never drafted); agree[j] = the draft's greedy token at trajectory position j is
    right. Steps start while fewer than `stop` tokens were emitted (decode's max_new_tokens; the trajectory
    should run k tokens further so the last steps are judged in full); judged = drafts the trajectory
    covers (k, fewer at its end)."""
    n = len(agree)
    stop = n if stop is None else min(stop, n)
    steps, i = [], 1
    while i < stop:
        a, judged = 0, min(k, n - i)
        while a < judged and agree[i + a]:
            a += 1
        steps.append((a, judged))
        i += a + 1
    return steps


def emitted_accepted(agree: np.ndarray, k: int, stop: int) -> int:
    """Accepted drafts that decoding records along the trajectory: as simulate_chain, but a step cut at
    `stop` tokens counts only the drafts it emitted (harness.engine.scheduler counts emitted tokens)."""
    total, i = 0, 1
    for a, _ in simulate_chain(agree, k, stop):
        total += min(a, stop - i)
        i += a + 1
    return total


def simulated_acceptance(agreements: list[np.ndarray], k_max: int, stop: int | None = None) -> tuple[list[float], int]:
    """(conditional acceptance a_1..a_kmax, steps) of chains of k_max along the trajectories."""
    from harness.reports.summary import acceptance_by_position

    steps = [s for ag in agreements for s in simulate_chain(ag, k_max, stop)]
    if not steps:
        return [math.nan] * k_max, 0
    acc, judged = np.asarray(steps).T
    _, cond = acceptance_by_position(acc, judged, k_max)
    return [float(c) for c in cond], len(steps)


# ----------------------------------------------------------------------------- candidates and choice

def candidate_sets(num_layers: int, layer_score: dict[int, float], cfg: SearchConfig) -> list[tuple[int, ...]]:
    """Skip sets to try: for each size m, the m layers whose lone removal keeps the most agreement, and
    the m middle layers of the skippable range. Deduplicated, in order."""
    lo, hi = cfg.protect, num_layers - cfg.protect  # skippable: lo .. hi-1
    span = hi - lo
    if span < 1:
        raise UserError(f"the target has {num_layers} layers: none is left to skip with protect={cfg.protect}")
    ranked = sorted(layer_score, key=lambda l: (-layer_score[l], l))
    sizes = sorted({min(span, max(1, round(f * num_layers))) for f in cfg.sizes})
    out: list[tuple[int, ...]] = []
    for m in sizes:
        for cand in (tuple(sorted(ranked[:m])), tuple(range(lo + (span - m) // 2, lo + (span - m) // 2 + m))):
            if cand not in out:
                out.append(cand)
    return out


def choose(rows: list[dict]) -> dict:
    """The candidate of best predicted tok/s (fewer skipped layers on ties)."""
    return max(rows, key=lambda r: (r["predicted_tok_s"], -len(r["skip"])))


def choose_measured(rows: list[dict]) -> dict:
    """The candidate of best measured tok/s among the timed ones (fewer skipped layers on ties)."""
    timed = [r for r in rows if not math.isnan(r.get("measured_tok_s", math.nan))]
    if not timed:
        raise ValueError("no candidate was timed")
    return max(timed, key=lambda r: (r["measured_tok_s"], -len(r["skip"])))


@dataclass
class Timings:
    """What the cost model needs besides acceptance, measured once per target (batch 1)."""

    t_forward: dict[int, float]  # tokens per forward -> seconds
    t_accept: dict[int, float]  # K -> seconds
    t_draft: dict[int, dict[int, float]]  # kept layers -> K -> seconds


def measure_times(target: Target, drafters: dict, context_ids: list[int], cfg: SearchConfig) -> Timings:
    """The cost model's times at batch 1 after `context` cached tokens: every forward size and every draft
    model and K are timed in turn, `warmup` + `repeats` rounds, and each keeps its fastest timed call (the
    least disturbed by other work on a shared machine). Verification: harness.calibrate.measure_accept."""
    from harness.calibrate import measure_accept
    from harness.drafters.base import Committed, DraftContext

    dev, K = target.device, cfg.k_max
    target.reset(1)
    target.prefill(torch.tensor([context_ids], dtype=torch.long, device=dev))
    fwd_ids = {t: torch.tensor([(context_ids * (t // len(context_ids) + 1))[:t]], dtype=torch.long, device=dev)
               for t in range(1, K + 2)}
    ctxs = {kept: DraftContext(history=[list(context_ids)], k=K, temperature=0.0, seed=cfg.seed, device=dev)
            for kept in drafters}
    rejected = Committed(num_accepted=torch.zeros(1, dtype=torch.long, device=dev), accepted=[0],
                         emitted=[[context_ids[-1]]])
    for kept, d in drafters.items():  # the first proposal feeds the whole context: never timed
        d.begin(ctxs[kept])
        d.propose(ctxs[kept])
        d.observe(ctxs[kept], rejected)
    t_fwd = {t: math.inf for t in fwd_ids}
    t_draft = {kept: {k: math.inf for k in range(1, K + 1)} for kept in drafters}

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    with torch.inference_mode():
        for rnd in range(cfg.warmup + cfg.repeats):
            for t, ids in fwd_ids.items():
                dt = timed(lambda: target.forward(ids))  # no commit: the same slots every time
                t_fwd[t] = min(t_fwd[t], dt) if rnd >= cfg.warmup else t_fwd[t]
            for kept, d in drafters.items():
                ctx = ctxs[kept]
                for k in range(1, K + 1):
                    ctx.k = k
                    dt = timed(lambda: d.propose(ctx))
                    d.observe(ctx, rejected)
                    t_draft[kept][k] = min(t_draft[kept][k], dt) if rnd >= cfg.warmup else t_draft[kept][k]
    acc, _ = measure_accept(target, [1], K, True, 0.0, cfg.seed, "auto", cfg.repeats, cfg.warmup, cfg.context)
    target.reset(1)
    return Timings(t_forward=t_fwd, t_accept=acc[1], t_draft=t_draft)


def predict(timings: Timings, kept: int, accept_cond: list[float], k_max: int, target_name: str = "target"):
    """(best K, prediction dict) from the cost model for a draft model that keeps `kept` layers."""
    from harness.calibrate import Calibration

    cal = Calibration(target=target_name, drafter="selfspec", device="", dtype="", temperature=0.0, k_max=k_max,
                      context=0, batch_sizes=[1], t_forward={1: timings.t_forward}, t_draft={1: timings.t_draft[kept]},
                      t_accept={1: timings.t_accept}, accept_cond=accept_cond, draft_avail=[1.0] * k_max)
    k = cal.best_k(1)
    return k, cal.predict(1, k)


# ----------------------------------------------------------------------------- the search

def search(target: Target, cfg: SearchConfig | None = None, prompts=None, timings: Timings | None = None,
           measure: bool = True) -> dict:
    """Runs the search (module docstring). Returns {"skip": chosen set, "k": its best K, "table": rows,
    "config": cfg, ...}. `timings` replaces the measured times (tests); measure=False skips the timed decodes."""
    from harness.calibrate import calibration_prompts
    from harness.drafters.ar import AR
    from harness.engine.scheduler import decode
    from harness.targets.chat import eos_ids, prompt_ids

    cfg = cfg or SearchConfig()
    prompts = prompts if prompts is not None else calibration_prompts(cfg.prompts)
    L = target.num_layers
    eos = eos_ids(target)
    bar = tqdm(total=3, desc="selfspec search", unit="stage", dynamic_ncols=True)

    # 1. trajectories
    seqs = []
    for p in prompts:
        ids = prompt_ids(target.tokenizer, [{"role": "user", "content": p.turns[0]}]) if hasattr(p, "turns") else list(p)
        dec = decode(target, AR(), ids, max_new_tokens=cfg.max_new_tokens + cfg.k_max, k=1, temperature=0.0,
                     seed=cfg.seed, eos_ids=eos)  # k_max further than the timed decodes: their last steps are judged
        if len(dec.new_ids) > 1:
            seqs.append((ids, dec.new_ids))
    if not seqs:
        raise UserError("the selfspec search needs calibration prompts whose answers have 2 tokens or more")
    bar.update()

    # 2. each layer's cost alone, then the candidates' acceptance
    bar.set_postfix_str("layer scores")
    layer_score = {}
    for l in range(cfg.protect, L - cfg.protect):
        ag = greedy_agreement(skip_view(target, (l,)), seqs)
        layer_score[l] = float(np.concatenate(ag).mean())
    cands = candidate_sets(L, layer_score, cfg)
    rows, agreements = [], []
    for skip in cands:
        ag = greedy_agreement(skip_view(target, skip), seqs)
        cond, steps = simulated_acceptance(ag, cfg.k_max, cfg.max_new_tokens)
        agreements.append(ag)
        rows.append(dict(skip=list(skip), kept=L - len(skip), agreement=float(np.concatenate(ag).mean()),
                         accept_cond=cond, sim_steps=steps))
    bar.update()

    # 3. the cost model
    bar.set_postfix_str("timing")
    if timings is None:
        context_ids = (seqs[0][0] * (cfg.context // len(seqs[0][0]) + 1))[:cfg.context]
        drafters = {}
        for r in rows:
            drafters.setdefault(r["kept"], skip_view(target, r["skip"]))
        timings = measure_times(target, drafters, context_ids, cfg)
        target.reset(1)
    for r, ag in zip(rows, agreements):
        k, pred = predict(timings, r["kept"], r["accept_cond"], cfg.k_max, target.name)
        r.update(k=k, **pred, sim_accepted=[emitted_accepted(g, k, cfg.max_new_tokens) for g in ag])
    predicted = choose(rows)
    for r in rows:
        r["predicted_best"] = r is predicted

    # 4. ar and every candidate decoded (at its best K) and timed, each after a warm-up decode; `rounds`
    # interleaved passes, the fastest kept (the least disturbed by other work on the machine)
    ar_tok_s = math.nan
    if measure:
        bar.set_postfix_str("timed decodes")
        runs = [(None, AR(), 1)] + [(r, skip_view(target, r["skip"]), r["k"]) for r in rows]
        best_ar = {}
        for _ in tqdm(range(cfg.rounds), desc="selfspec timed rounds", unit="round", dynamic_ncols=True, leave=False):
            for r, drafter, k in runs:
                m = timed_decode(target, drafter, seqs, k, cfg, eos)
                held = best_ar if r is None else r
                if m["measured_tok_s"] > held.get("measured_tok_s", -1.0):
                    held.update(m)
        ar_tok_s = best_ar["measured_tok_s"]
        for r in rows:
            r["measured_speedup"] = r["measured_tok_s"] / ar_tok_s
    best = choose_measured(rows) if measure else predicted
    for r in rows:
        r["chosen"] = r is best
    bar.update()
    bar.close()
    target.reset(1)
    return dict(skip=best["skip"], k=best["k"], num_layers=L, target=target.name, ar_tok_s=ar_tok_s,
                timings=asdict(timings), chosen_by="measured_tok_s" if measure else "predicted_tok_s",
                predicted_skip=predicted["skip"],
                layer_agreement={str(l): s for l, s in layer_score.items()}, table=rows,
                config=asdict(cfg), prompts=[getattr(p, "prompt_id", str(i)) for i, p in enumerate(prompts)])


def timed_decode(target, drafter, seqs, k: int, cfg: SearchConfig, eos) -> dict:
    """Decodes every prompt of `seqs` at batch 1 after one short warm-up decode; tok/s, tau, accept rate and
    the accepted drafts per prompt."""
    from harness.engine.scheduler import decode

    decode(target, drafter, seqs[0][0], max_new_tokens=8, k=k, temperature=0.0, seed=cfg.seed, eos_ids=eos)
    tokens, wall, emitted, steps, drafted, per_prompt = 0, 0.0, 0, 0, 0, []
    for ids, _ in seqs:
        t0 = time.perf_counter()
        dec = decode(target, drafter, ids, max_new_tokens=cfg.max_new_tokens, k=k, temperature=0.0, seed=cfg.seed,
                     eos_ids=eos)
        wall += time.perf_counter() - t0
        tokens += len(dec.new_ids)
        emitted += sum(s["emitted"] for s in dec.steps)
        steps += len(dec.steps)
        drafted += sum(s["drafted"] for s in dec.steps)
        per_prompt.append(sum(s["accepted"] for s in dec.steps))
    return dict(measured_tok_s=tokens / wall, measured_tau=emitted / max(steps, 1),
                measured_accept_rate=sum(per_prompt) / max(drafted, 1), measured_accepted=per_prompt)


def format_table(result: dict) -> str:
    from harness.reports.summary import markdown_table

    rows = []
    for r in result["table"]:
        mark = (" *" if r["chosen"] else "") + (" (best predicted)" if r.get("predicted_best") else "")
        rows.append([",".join(map(str, r["skip"])) + mark, str(r["kept"]), f"{r['agreement']:.2f}", str(r["k"]),
                     f"{r['predicted_tau']:.2f}", f"{r['predicted_tok_s']:.1f}", f"{r['predicted_speedup']:.2f}x",
                     _fmt(r.get("measured_tau"), "{:.2f}"), _fmt(r.get("measured_tok_s"), "{:.1f}"),
                     _fmt(r.get("measured_speedup"), "{:.2f}x")])
    return markdown_table(["skip (* chosen)", "kept", "agreement", "K", "pred tau", "pred tok/s", "pred speedup",
                           "meas tau", "meas tok/s", "meas speedup"], rows)


def _fmt(v, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


# ----------------------------------------------------------------------------- CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("selfspec-search", help="search the layers selfspec skips (predicted vs measured tok/s)",
                              description="Search the set of layers the selfspec drafter skips, on the calibration "
                                          "prompts: the cost model predicts each candidate's tok/s and K, every "
                                          "candidate is decoded and timed, and the best measured is chosen.")
    d = SearchConfig()
    p.add_argument("--target", default="smollm2-135m", help="preset, model folder, .gguf or hub id")
    p.add_argument("--out", required=True, type=Path, help="the search.json to write (pass it to --skip-layers)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=d.prompts, help=f"calibration prompts (default {d.prompts})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--k-max", type=int, default=d.k_max)
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from harness.targets import load_target

    if args.prompts < 1 or args.max_new_tokens < 2 or not 1 <= args.k_max <= 16:
        raise UserError("--prompts must be >= 1, --max-new-tokens >= 2 and --k-max in 1..16")
    target = load_target(args.target, backend=args.backend, device=args.device, dtype=args.dtype, max_len=args.max_len)
    result = search(target, SearchConfig(prompts=args.prompts, max_new_tokens=args.max_new_tokens, k_max=args.k_max))
    print(format_table(result))
    print(f"\nchosen (best {result['chosen_by'].replace('_tok_s', ' tok/s')}): skip {','.join(map(str, result['skip']))} at "
          f"K = {result['k']}; best predicted: skip {','.join(map(str, result['predicted_skip']))}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, allow_nan=True), encoding="utf-8")
    (args.out.parent / "env.json").write_text(json.dumps(search_environment(target, args), indent=2))
    print(f"search: {args.out} (env.json beside it)")
    return 0


def search_environment(target, args) -> dict:
    """What a search result needs to be compared: machine, versions, dtype, threads, commit, command."""
    import platform
    import sys
    from datetime import datetime

    import transformers

    from harness.provenance import git_commit

    return dict(device=str(target.device), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, dtype=str(target.dtype).replace("torch.", ""),
                target=target.name, backend=target.backend, threads=torch.get_num_threads(), host=platform.node(),
                processor=platform.processor() or platform.machine(), git_commit=git_commit(),
                command=" ".join(["spec-harness"] + sys.argv[1:]), time=datetime.now().isoformat(timespec="seconds"))
