"""Cost model of speculative decoding: predicted tok/s for each K and batch size, and `--k auto`.

    spec-harness calibrate --target T --drafter D [--batch-sizes 1,4,16,64] --out FILE.json

Measured (medians of `repeats` timed calls after `warmup` untimed ones, the device synchronised
around each call; the interquartile range is kept beside each median):
  t_forward(T, B)   one target forward of T new tokens per row over B rows holding `context` cached
                    tokens (T = 1..k_max+1, or --tokens for tree sizes)
  t_draft(K, B)     one drafter.propose of K tokens per row (steady state: one pending token)
  t_accept(K, B)    verification of [B, K+1] rows plus the step's host read
  a_j, d_j          on the calibration prompts (batch 1, K = k_max, the run's temperature):
                    a_j = conditional acceptance at position j (harness vocabulary), d_j = #steps that
                    drafted >= j and accepted >= j-1 / #steps that accepted >= j-1 (1 for model
                    drafters; below 1 when n-gram lookups come up short)

Model (chains). P(accepted >= j) = prod_{i<=j} d_i a_i;  E[emitted | K] = 1 + sum_{j=1..K} P(accepted >= j)
(a drafter asked for K tokens proposes the first K of its k_max proposal: greedy model drafters and
n-gram lookups do). t_step(K, B) = t_draft(K, B) + t_forward(K+1, B) + t_accept(K, B).
Predicted tok/s per sequence = E / t_step, in total B E / t_step. The ar step is t_step(0, B) =
t_forward(1, B) + t_accept(0, B) (ar runs the same loop, verification of an empty chain included), so
predicted speedup = (E / t_step(K, B)) / (1 / t_step(0, B)). Host bookkeeping (t_other) is not modelled.

`--k auto` (cfg.extra["k_auto"]): each drafter runs at the K of best predicted tok/s at the run's batch
size. The calibration comes from cfg.extra["calibration"] (a file this command wrote) when it covers
the target, drafter and batch size, else from results/<run>/calibration.json, else it is measured and
cached there. Runs with a calibration at hand write the prediction into batch_runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.errors import UserError

FORMAT = 1
K_MAX = 8
FALLBACK_PROMPTS = (  # used when harness/suites/calibration.jsonl is missing
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that reverses the words of a sentence.",
    "What is 17 times 23? Show your working.",
    "Summarise the plot of a detective story you invent, in three sentences.",
)


# ----------------------------------------------------------------------------- the model

def expected_emitted(accept_cond, draft_avail, k: int) -> float:
    """E[emitted | K = k] = 1 + sum_{j<=k} prod_{i<=j} d_i a_i (NaN rates, never reached, count as 0)."""
    total, reach = 1.0, 1.0
    for j in range(k):
        a = accept_cond[j] if j < len(accept_cond) else 0.0
        d = draft_avail[j] if j < len(draft_avail) else 0.0
        reach *= (0.0 if not math.isfinite(a) else a) * (0.0 if not math.isfinite(d) else d)
        total += reach
    return total


@dataclass
class Calibration:
    target: str
    drafter: str
    device: str
    dtype: str
    temperature: float
    k_max: int
    context: int  # cached tokens per row while timing
    batch_sizes: list[int]
    t_forward: dict[int, dict[int, float]]  # B -> tokens per row T -> seconds (median)
    t_draft: dict[int, dict[int, float]]  # B -> K (1..k_max) -> seconds
    t_accept: dict[int, dict[int, float]]  # B -> K (0..k_max) -> seconds
    accept_cond: list[float]  # a_j, j = 1..k_max
    draft_avail: list[float]  # d_j, j = 1..k_max
    acceptance_steps: int = 0  # steps a_j and d_j were measured on
    iqr: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)  # table -> B -> T/K -> IQR

    def expected_emitted(self, k: int) -> float:
        return expected_emitted(self.accept_cond, self.draft_avail, k)

    def t_step(self, k: int, b: int) -> float:
        draft = self.t_draft[b][k] if k else 0.0
        return draft + self.t_forward[b][k + 1] + self.t_accept[b][k]

    def predict(self, b: int, k: int) -> dict:
        """predicted_tau (= E[emitted]), predicted_tok_s (per sequence), predicted_speedup (vs ar)."""
        e, t = self.expected_emitted(k), self.t_step(k, b)
        return dict(predicted_tau=e, predicted_tok_s=e / t, predicted_speedup=(e / t) * self.t_step(0, b))

    def ks(self, b: int) -> list[int]:
        return [k for k in range(1, self.k_max + 1) if k + 1 in self.t_forward.get(b, {})]

    def best_k(self, b: int) -> int:
        """The K of best predicted tok/s at batch size b (the smallest K on ties)."""
        if b not in self.t_forward:
            raise UserError(f"the calibration of {self.drafter} has no batch size {b}")
        return max(self.ks(b), key=lambda k: (self.predict(b, k)["predicted_tok_s"], -k))

    def table(self) -> list[dict]:
        rows = []
        for b in self.batch_sizes:
            best = self.best_k(b)
            for k in self.ks(b):
                p = self.predict(b, k)
                rows.append(dict(batch_size=b, k=k, tau=p["predicted_tau"], t_step_ms=1000 * self.t_step(k, b),
                                 tok_s_seq=p["predicted_tok_s"], tok_s_total=b * p["predicted_tok_s"],
                                 speedup=p["predicted_speedup"], best=k == best))
        return rows

    def to_dict(self) -> dict:
        d = asdict(self)
        d["predictions"] = self.table()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        def ints(table):
            return {int(b): {int(t): float(v) for t, v in row.items()} for b, row in table.items()}

        return cls(target=d["target"], drafter=d["drafter"], device=d["device"], dtype=d["dtype"],
                   temperature=float(d["temperature"]), k_max=int(d["k_max"]), context=int(d["context"]),
                   batch_sizes=[int(b) for b in d["batch_sizes"]], t_forward=ints(d["t_forward"]),
                   t_draft=ints(d["t_draft"]), t_accept=ints(d["t_accept"]),
                   accept_cond=[_float(a) for a in d["accept_cond"]], draft_avail=[_float(a) for a in d["draft_avail"]],
                   acceptance_steps=int(d.get("acceptance_steps", 0)),
                   iqr={name: ints(t) for name, t in d.get("iqr", {}).items()})

    def merged(self, other: "Calibration") -> "Calibration":
        """This calibration with the batch sizes of `other` (same target and drafter) added."""
        out = Calibration.from_dict(self.to_dict())
        for name in ("t_forward", "t_draft", "t_accept"):
            getattr(out, name).update(getattr(other, name))
        for name, table in other.iqr.items():
            out.iqr.setdefault(name, {}).update(table)
        out.batch_sizes = sorted(set(self.batch_sizes) | set(other.batch_sizes))
        return out


def _float(v) -> float:
    return math.nan if v is None else float(v)


def load_calibrations(path: Path) -> dict[str, Calibration]:
    """drafter -> Calibration from a file `spec-harness calibrate` (or a run) wrote; {} when absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: Calibration.from_dict(c) for name, c in data["calibrations"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is not a calibration file ({err}): write one with `spec-harness calibrate`") from None


def save_calibrations(path: Path, cals: dict[str, Calibration]) -> None:
    data = {"format": FORMAT, "calibrations": {name: c.to_dict() for name, c in cals.items()}}
    Path(path).write_text(json.dumps(data, indent=1, allow_nan=True), encoding="utf-8")


# ----------------------------------------------------------------------------- measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_iqr(times: list[float]) -> tuple[float, float]:
    q = np.percentile(times, [25, 75]) if len(times) > 1 else (0.0, 0.0)
    return statistics.median(times), float(q[1] - q[0])


def _time(fn, device, repeats: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _median_iqr(times)


@torch.inference_mode()
def measure_forward(target, batch_sizes, tokens, context_ids: list[int], repeats: int, warmup: int):
    """(t_forward, iqr): B -> T -> seconds of one forward of T tokens per row after `context` cached."""
    dev, med, iqr = target.device, {}, {}
    for b in batch_sizes:
        target.reset(b)
        target.prefill(torch.tensor([context_ids] * b, dtype=torch.long, device=dev))
        med[b], iqr[b] = {}, {}
        for t in tokens:
            ids = torch.tensor([(context_ids * (t // len(context_ids) + 1))[:t]] * b, dtype=torch.long, device=dev)
            med[b][t], iqr[b][t] = _time(lambda: target.forward(ids), dev, repeats, warmup)  # no commit: same slots
    return med, iqr


@torch.inference_mode()
def measure_accept(target, batch_sizes, k_max: int, has_q: bool, temperature: float, seed: int,
                   verify_backend: str, repeats: int, warmup: int, context: int):
    """(t_accept, iqr): B -> K -> seconds of verify_chain on [B, K+1, V] logits plus the host read."""
    from harness.types import Proposal
    from harness.engine.verify import verify_chain

    dev, V = target.device, target.vocab_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    med, iqr = {}, {}
    for b in batch_sizes:
        med[b], iqr[b] = {}, {}
        positions = torch.full((b,), context + 1, dtype=torch.long, device=dev)
        for k in range(k_max + 1):
            logits = torch.randn(b, k + 1, V, generator=g).to(dev, target.dtype)  # [B, K+1, V]
            tokens = torch.randint(0, V, (b, k), generator=g).to(dev)
            q = torch.softmax(torch.randn(b, k, V, generator=g), -1).to(dev) if has_q and k else None  # [B, K, V]
            prop = Proposal(tokens=tokens, q=q, num_draft=None if has_q else torch.full((b,), k, dtype=torch.long))

            def step():
                res = verify_chain(logits, prop, temperature, seed, positions, verify_backend)
                torch.cat([res.num_accepted[:, None], res.emitted], 1).tolist()

            med[b][k], iqr[b][k] = _time(step, dev, repeats, warmup)
    return med, iqr


@torch.inference_mode()
def measure_draft(target, drafter, batch_sizes, k_max: int, context_ids: list[int], temperature: float,
                  seed: int, repeats: int, warmup: int):
    """(t_draft, iqr): B -> K -> seconds of one propose in steady state (each timed call follows an
    observe in which every row rejected its first draft, so one token is pending)."""
    from harness.drafters.base import Committed, DraftContext

    dev, med, iqr = target.device, {}, {}
    for b in batch_sizes:
        hidden = {}
        if drafter.hidden_layers:  # the drafter reads the target's hidden states of the context
            target.reset(b)
            hidden = target.prefill(torch.tensor([context_ids] * b, dtype=torch.long, device=dev),
                                    hidden_layers=drafter.hidden_layers).hidden
        med[b], iqr[b] = {}, {}
        for k in range(1, k_max + 1):
            ctx = DraftContext(history=[list(context_ids) for _ in range(b)], k=k, temperature=temperature, seed=seed,
                               device=dev, hidden={h: v[:, -1:] for h, v in hidden.items()},
                               hidden_valid=torch.ones(b, dtype=torch.long, device=dev))
            ctx.prefill_hidden = hidden
            drafter.begin(ctx)
            rejected = Committed(num_accepted=torch.zeros(b, dtype=torch.long, device=dev), accepted=[0] * b,
                                 emitted=[[context_ids[-1]] for _ in range(b)])
            times = []
            for i in range(warmup + 1 + repeats):  # the first call feeds the whole context: never timed
                _sync(dev)
                t0 = time.perf_counter()
                drafter.propose(ctx)
                _sync(dev)
                if i > warmup:
                    times.append(time.perf_counter() - t0)
                drafter.observe(ctx, rejected)
            med[b][k], iqr[b][k] = _median_iqr(times)
    return med, iqr


def measure_acceptance(target, drafter, prompts, k_max: int, temperature: float, seed: int,
                       max_new_tokens: int, verify_backend: str) -> tuple[list[float], list[float], int]:
    """(a_j, d_j, steps) from batch-1 decoding of each prompt's first turn at K = k_max."""
    from harness.engine.scheduler import decode
    from harness.targets.chat import eos_ids, prompt_ids
    from harness.reports.summary import acceptance_by_position

    eos = eos_ids(target)
    acc, depth = [], []
    for p in prompts:
        ids = prompt_ids(target.tokenizer, [{"role": "user", "content": p.turns[0]}])
        if len(ids) + max_new_tokens + k_max + 2 > target.max_len:
            continue  # does not fit the cache
        dec = decode(target, drafter, ids, max_new_tokens=max_new_tokens, k=k_max, temperature=temperature,
                     seed=seed, eos_ids=eos, verify_backend=verify_backend)
        acc += [s["accepted"] for s in dec.steps]
        depth += [s["depth"] for s in dec.steps]
    if not acc:
        raise UserError(f"no calibration prompt fits --max-len {target.max_len} with {max_new_tokens} new tokens "
                        f"and K = {k_max}: raise --max-len")
    acc_a, dep_a = np.asarray(acc, dtype=np.int64), np.asarray(depth, dtype=np.int64)
    _, cond = acceptance_by_position(acc_a, dep_a, k_max)
    avail = []
    for j in range(1, k_max + 1):
        reached = acc_a >= j - 1
        avail.append(float(np.mean(dep_a[reached] >= j)) if reached.any() else math.nan)
    return [float(c) for c in cond], avail, len(acc)


def calibration_prompts(limit: int | None = None):
    from harness.suites import Prompt, load_suite

    try:
        prompts = load_suite("calibration")
    except (UserError, FileNotFoundError):
        prompts = [Prompt(prompt_id=f"fallback/{i}", category="mixed", suite="calibration", turns=(t,))
                   for i, t in enumerate(FALLBACK_PROMPTS)]
    return prompts[:limit] if limit else prompts


def calibrate(target, drafter, name: str, *, batch_sizes, k_max: int = K_MAX, tokens=None, temperature: float = 0.0,
              seed: int = 0, prompts=None, max_new_tokens: int = 64, context: int = 256, repeats: int = 5,
              warmup: int = 2, verify_backend: str = "auto") -> Calibration:
    """Measures everything the cost model needs (see the module docstring)."""
    from harness.targets.chat import prompt_ids

    prompts = prompts if prompts is not None else calibration_prompts()
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    tokens = sorted(set(tokens or []) | set(range(1, k_max + 2)))
    # the cache holds the context, then the widest forward, or one token per timed draft call plus K
    context = max(1, min(context, target.max_len - max(tokens) - (warmup + repeats + 2)))
    ids = prompt_ids(target.tokenizer, [{"role": "user", "content": prompts[0].turns[0]}])
    context_ids = (ids * (context // len(ids) + 1))[:context]
    a, d, n = measure_acceptance(target, drafter, prompts, k_max, temperature, seed, max_new_tokens, verify_backend)
    t_fwd, i_fwd = measure_forward(target, batch_sizes, tokens, context_ids, repeats, warmup)
    t_acc, i_acc = measure_accept(target, batch_sizes, k_max, drafter.has_q, temperature, seed, verify_backend,
                                  repeats, warmup, context)
    t_dr, i_dr = measure_draft(target, drafter, batch_sizes, k_max, context_ids, temperature, seed, repeats, warmup)
    target.reset(1)
    return Calibration(target=target.name, drafter=name, device=str(target.device), dtype=str(target.dtype).replace("torch.", ""),
                       temperature=temperature, k_max=k_max, context=context, batch_sizes=batch_sizes,
                       t_forward=t_fwd, t_draft=t_dr, t_accept=t_acc, accept_cond=a, draft_avail=d,
                       acceptance_steps=n, iqr=dict(t_forward=i_fwd, t_draft=i_dr, t_accept=i_acc))


# ----------------------------------------------------------------------------- runs (--k auto)

def plan_for_run(cfg, target, drafter, name: str, run_dir: Path) -> tuple[int, dict | None]:
    """(K, prediction) for one drafter of a run: K = cfg.k, or the best predicted K with --k auto
    (measuring the calibration first when none covers the run); the prediction when a calibration
    covers the drafter at the run's batch size."""
    from harness.drafters import is_peer

    auto, given = bool(cfg.extra.get("k_auto")), cfg.extra.get("calibration")
    if name == "ar" or is_peer(drafter) or not (auto or given):
        return cfg.k, None
    if auto and is_tree_drafter(drafter):
        raise UserError(f"--k auto picks chain lengths, but {name} drafts trees here: give a fixed --k, or "
                        "--total-tokens 0 for chains")
    b = cfg.batch_size
    cal = _usable(load_calibrations(Path(given)), target, name, cfg, source=given) if given else None
    if auto and (cal is None or b not in cal.batch_sizes):
        cached_path = Path(run_dir) / "calibration.json"
        cached = load_calibrations(cached_path)
        cal = _usable(cached, target, name, cfg, source=None)
        if cal is None or b not in cal.batch_sizes:
            fresh = calibrate(target, drafter, name, batch_sizes=[b], k_max=max(K_MAX, cfg.k),
                              temperature=cfg.temperature, seed=cfg.seed,
                              max_new_tokens=min(64, cfg.max_new_tokens), verify_backend=cfg.verify_backend)
            cal = cal.merged(fresh) if cal is not None else fresh
            cached[name] = cal
            save_calibrations(cached_path, cached)
    if cal is None or b not in cal.batch_sizes:
        return cfg.k, None
    k = cal.best_k(b) if auto else cfg.k
    return k, (cal.predict(b, k) if k in cal.ks(b) else None)


def is_tree_drafter(drafter) -> bool:
    """Drafters that propose trees (EAGLE with a tree shape): the chain cost model does not apply."""
    return getattr(drafter, "tree", None) is not None


def _usable(cals: dict, target, name: str, cfg, source) -> Calibration | None:
    cal = cals.get(name)
    if cal is None:
        return None
    if cal.target != target.name:
        if source:
            raise UserError(f"calibration file {source} is for target {cal.target}, not {target.name}: "
                            "calibrate this target first")
        return None
    return cal if cal.temperature == cfg.temperature else None


# ----------------------------------------------------------------------------- CLI

def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_k(text: str) -> tuple[int | None, bool]:
    """--k for `spec-harness run`: an integer, or "auto" -> (None, True)."""
    if text.strip().lower() == "auto":
        return None, True
    try:
        return int(text), False
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes an integer or 'auto', got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="measure the cost model that predicts tok/s per K and batch size",
                              description="Measure forward, draft and verification times and acceptance, and "
                                          "predict tok/s for each K and batch size (used by --k auto).")
    p.add_argument("--target", required=True, help="preset, model folder, .gguf or hub id")
    p.add_argument("--drafter", required=True, help="drafter name(s), comma-separated (not ar)")
    p.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16, 64], help="default 1,4,16,64")
    p.add_argument("--k-max", type=int, default=K_MAX, help=f"largest K predicted (default {K_MAX})")
    p.add_argument("--tokens", type=_ints, default=None, help="extra tokens-per-forward to time (tree sizes)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="calibration prompts used for acceptance")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per calibration prompt")
    p.add_argument("--context", type=int, default=256, help="cached tokens per row while timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--verify-backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--layerskip-layers", type=int, default=None)
    p.add_argument("--draft-model", default=None)
    p.add_argument("--head", default=None)
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from harness.config import RunConfig
    from harness.drafters import build_drafter, is_peer
    from harness.engine.fast import enable_fast, enable_fast_drafter, resolve_fast
    from harness.reports.summary import markdown_table
    from harness.targets import load_target

    names = [n.strip() for n in args.drafter.split(",") if n.strip()]
    if "ar" in names:
        raise UserError("ar is the baseline every speedup is over: calibrate a drafter (e.g. --drafter ngram)")
    if not 1 <= args.k_max <= 64:
        raise UserError(f"--k-max must be between 1 and 64, got {args.k_max}")
    cfg = RunConfig(target=args.target, backend=args.backend, device=args.device, dtype=args.dtype,
                    max_len=args.max_len, k=args.k_max, layerskip_layers=args.layerskip_layers,
                    draft_model=args.draft_model, head=args.head, temperature=args.temperature, seed=args.seed)
    if max(args.batch_sizes) > 1 and args.backend == "hf":
        raise UserError("the hf backend decodes one sequence at a time: use --backend native for batch sizes > 1")
    target = load_target(cfg.target, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype, max_len=cfg.max_len)
    fast = resolve_fast(None, target)  # time the path runs take: CUDA graphs on a GPU (harness.engine.fast)
    if fast:
        target = enable_fast(target)
    prompts = calibration_prompts(args.limit)
    cals = load_calibrations(args.out) if args.out.exists() else {}
    for name in names:
        drafter = build_drafter(name, target, cfg)
        if fast:
            drafter = enable_fast_drafter(drafter)
        if is_peer(drafter):
            raise UserError(f"{name} is a peer (transformers' generate): it has no step cost to model")
        cal = calibrate(target, drafter, name, batch_sizes=args.batch_sizes, k_max=args.k_max, tokens=args.tokens,
                        temperature=args.temperature, seed=args.seed, prompts=prompts,
                        max_new_tokens=args.max_new_tokens, context=args.context, repeats=args.repeats,
                        warmup=args.warmup, verify_backend=args.verify_backend)
        cals[name] = cal
        print(f"\n{name} on {target.name} ({cal.device}, {cal.dtype}); acceptance over {cal.acceptance_steps} steps: "
              + " ".join(f"a{j + 1}={a:.2f}" for j, a in enumerate(cal.accept_cond)))
        rows = [[str(r["batch_size"]), f"{r['k']}{' *' if r['best'] else ''}", f"{r['tau']:.2f}",
                 f"{r['t_step_ms']:.2f}", f"{r['tok_s_seq']:.1f}", f"{r['tok_s_total']:.1f}", f"{r['speedup']:.2f}x"]
                for r in cal.table()]
        print(markdown_table(["batch", "K (* best)", "E[emitted]", "ms/step", "tok/s per seq", "tok/s total",
                              "speedup vs ar"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_calibrations(args.out, cals)
    print(f"\ncalibration: {args.out}")
    return 0
