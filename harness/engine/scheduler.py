"""Batched decoding with continuous batching (`--batch-size B`, native backend), and the run path of
`--k auto` (at any batch size).

B sequences decode together in one loop like harness.engine.step: each step the drafter proposes for every
row, the target verifies [B, K+1] in one forward, verification returns num_accepted per row and the
target commits per row (a ragged pointer move). When a row's turn ends (EOS or max_new_tokens) the row
takes that prompt's next turn, or else the next waiting prompt: the row's cache is emptied
(lengths[b] = 0) and the new context is prefilled into that row alone while the other rows keep their
state, and the drafter hears `begin_row(ctx, b)`. When no prompt waits, finished rows are parked and
the batch shrinks through buckets (B, then powers of two): live rows from the end move into parked rows
(one cache row copied each) and the drafter hears `keep_rows` (see BatchDecoder).

Records (see harness.records): per row and step exactly the fields of the batch-1 loop, with
batch_size = B and the phase times of the batched step the row took part in; per prompt the fields of
harness.runner, with wall_s = time from joining the batch to leaving it, plus joined_s and left_s
(seconds from the start of the batched run). batch_runs.jsonl: one line per drafter and attempt with
the wall time of the whole batched run, tok_s_total = all new tokens / that time, K, k_auto and, when a
calibration is at hand, the cost model's prediction (harness.calibrate). `batch_summary(run_dir)`
joins them with the per prompt records.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from harness.engine.step import _cut
from harness.drafters import is_peer
from harness.drafters.base import Committed, DraftContext, Drafter
from harness.errors import UserError
from harness.records import JsonlWriter, read_jsonl
from harness.suites import Prompt
from harness.timing import PhaseClock
from harness.types import Proposal
from harness.engine.verify import verify_chain

BATCH_RUNS = "batch_runs.jsonl"
BATCH_FIELDS = (  # batch_runs.jsonl
    "drafter", "suite", "batch_size", "k", "k_auto", "prompts", "new_tokens", "wall_s", "tok_s_total",
    "predicted_tau", "predicted_tok_s", "predicted_speedup",
)


# ----------------------------------------------------------------------------- cache rows

def _cache_owner(target):
    """The native target that holds the cache (harness.engine.fast wraps one in a FastTarget)."""
    return getattr(target, "inner", target)


@contextmanager
def one_row(target, b: int, empty: bool = False):
    """Inside the block `target` is a batch of one: row b of its cache, as a view (writes land in the
    batch's cache). empty=True starts the row empty (lengths[b] = 0). The other rows are untouched."""
    owner = _cache_owner(target)
    if getattr(owner, "k_cache", None) is None:
        raise UserError("batches with changing members need the native backend: use --backend native")
    k, v, lengths = owner.k_cache, owner.v_cache, owner.lengths
    owner.k_cache, owner.v_cache = k[:, b:b + 1], v[:, b:b + 1]  # [L, 1, Hkv, S, D]
    owner.lengths = torch.zeros_like(lengths[b:b + 1]) if empty else lengths[b:b + 1].clone()
    try:
        yield target
    finally:
        row_length = owner.lengths
        owner.k_cache, owner.v_cache = k, v
        owner.lengths = lengths.clone()
        owner.lengths[b] = row_length[0]


def keep_cache_rows(target, rows: list[int]) -> None:
    """Row i takes what row rows[i] held (cache and length); the cache shrinks to len(rows) rows (a
    view). Only rows that move are copied."""
    owner = _cache_owner(target)
    moved = [(i, r) for i, r in enumerate(rows) if r != i]
    if moved:
        dst = torch.tensor([i for i, _ in moved], device=owner.k_cache.device)
        src = torch.tensor([r for _, r in moved], device=owner.k_cache.device)
        for cache in (owner.k_cache, owner.v_cache):  # [L, B, Hkv, S, D]
            cache[:, dst] = cache[:, src]
    n = len(rows)
    owner.lengths = owner.lengths[torch.tensor(rows, dtype=torch.long, device=owner.lengths.device)]
    owner.k_cache, owner.v_cache = owner.k_cache[:, :n], owner.v_cache[:, :n]


def check_batchable(name: str, drafter) -> None:
    if is_peer(drafter):
        raise UserError(f"{name} (a peer) decodes one sequence at a time: drop it or use --batch-size 1")
    if type(drafter).begin_row is Drafter.begin_row:
        raise UserError(f"the {name} drafter does not decode batches yet: drop it or use --batch-size 1")


# ----------------------------------------------------------------------------- the batched loop

@dataclass
class Seq:
    """A prompt in the batch; its turns run one after another in its row."""

    prompt: Prompt
    joined: float  # perf_counter when it joined
    meter: object | None = None
    turn: int = 0  # the turn being decoded
    messages: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # this turn's prompt ids
    out: list[int] = field(default_factory=list)  # this turn's new ids
    history: list[int] = field(default_factory=list)  # ids + out: the drafter's view of this row
    prompt_tokens: int = 0
    answers: list[str] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # step records, all turns
    step_refs: list[int] = field(default_factory=list)  # per step record: index of its batched step
    turn_start: int = 0  # index in `steps` of this turn's first record


class BatchDecoder:
    """Decodes prompts `batch_size` at a time with continuous batching (see the module docstring).
    `on_finish(prompt, fields, steps)` is called as each prompt leaves the batch.

    Once no prompt waits, a finished row is parked (it stays in the forward with a one-token context,
    commits nothing and writes no records) until the live rows fit the next smaller bucket (B, then the
    powers of two below it); the batch then shrinks to that bucket. Step shapes therefore take a few
    batch sizes only, which keeps the CUDA graphs of harness.engine.fast few."""

    PARK_TOKEN = 0  # the context of a parked row

    def __init__(self, target, drafter: Drafter, *, batch_size: int, max_new_tokens: int, k: int,
                 temperature: float, seed: int, eos_ids: set[int], verify_backend: str = "auto",
                 new_meter=None, on_finish=None):
        self.target, self.drafter = target, drafter
        self.batch_size, self.max_new, self.k = batch_size, max_new_tokens, k
        self.temperature, self.seed, self.eos = temperature, seed, eos_ids
        self.verify_backend = verify_backend
        self.new_meter = new_meter  # () -> a fresh batch-1 meter, or None
        self.on_finish = on_finish
        self.dev = target.device
        self.clock = PhaseClock(self.dev)
        self.buckets = sorted({batch_size} | {2 ** i for i in range(batch_size.bit_length()) if 2 ** i < batch_size})

    # -- the run
    @torch.inference_mode()
    def run(self, prompts: list[Prompt]) -> float:
        """Decodes every prompt; returns the wall time of the whole batched run (seconds)."""
        self.queue = deque(prompts)
        self.ctx = None
        self.step_times: list[dict] = []
        self.t0 = self._now()
        n = min(self.batch_size, len(self.queue))
        self.target.reset(n)
        self.rows: list[Seq | None] = [None] * n  # None: a parked row
        self.prefill_hidden: list[dict] = [{} for _ in range(n)]
        for b in range(n):
            self.rows[b] = self._admit(b, None)
        self._shrink()
        if self.rows:
            self.ctx = DraftContext(history=self._histories(), k=self.k, temperature=self.temperature,
                                    seed=self.seed, device=self.dev, hidden=self._first_hidden(),
                                    hidden_valid=torch.ones(len(self.rows), dtype=torch.long, device=self.dev))
            self.ctx.prefill_hidden = None  # ragged over rows: begin_row gets each row's own
            self.drafter.begin(self.ctx)
        while self.rows:
            self._step()
        return self._now() - self.t0

    def _now(self) -> float:
        return _now(self.dev)

    def _first_hidden(self) -> dict[int, torch.Tensor]:
        """layer -> [B, 1, H]: each row's last prefill hidden state (zeros for a row never filled)."""
        out = {}
        for h in self.drafter.hidden_layers:
            rows = [ph[h][:, -1:] if h in ph else None for ph in self.prefill_hidden]  # each [1, 1, H]
            filler = torch.zeros_like(next(r for r in rows if r is not None))
            out[h] = torch.cat([r if r is not None else filler for r in rows])
        return out

    def _histories(self) -> list[list[int]]:
        return [s.history if s is not None else [self.PARK_TOKEN] for s in self.rows]

    # -- one step of the whole batch
    def _step(self) -> None:
        ctx, target, clock = self.ctx, self.target, self.clock
        clock.start()
        prop = self.drafter.propose(ctx)  # draft
        clock.mark("draft")
        if prop.is_tree:
            raise UserError(f"the {self.drafter.name} drafter proposes trees: batches verify chains only, "
                            "use --batch-size 1")
        last = torch.tensor([[h[-1]] for h in ctx.history], dtype=torch.long, device=self.dev)  # [B, 1]
        fwd = target.forward(torch.cat([last, prop.tokens.to(self.dev)], 1),
                             hidden_layers=self.drafter.hidden_layers)  # verify [B, K+1]
        clock.mark("verify")
        res = verify_chain(fwd.logits, prop, self.temperature, self.seed, target.lengths + 1, self.verify_backend)
        live = [s is not None for s in self.rows]
        keep = res.num_accepted + 1
        if not all(live):  # parked rows commit nothing
            keep = keep * torch.tensor(live, dtype=keep.dtype).to(self.dev)
        target.commit(keep)  # ragged pointer move
        host = torch.cat([res.num_accepted[:, None], res.emitted], 1).tolist()  # the one host read [B, 1+K+1]
        clock.mark("accept")
        K = prop.tokens.shape[1]
        drafted = [K] * len(host) if prop.num_draft is None else prop.num_draft.tolist()
        self._observe_meters(res, drafted)
        accepted = [h[0] for h in host]
        emitted = [h[1:a + 2] for h, a in zip(host, accepted)]
        ref = len(self.step_times)
        finished = []
        for b, seq in enumerate(self.rows):
            if seq is None:
                continue
            kept = _cut(emitted[b][:self.max_new - len(seq.out)], self.eos)
            seq.out.extend(kept)
            seq.history.extend(kept)
            seq.steps.append(dict(drafted=drafted[b], depth=drafted[b], accepted=accepted[b], emitted=len(kept),
                                  t_draft=None, t_verify=None, t_accept=None, t_other=None,
                                  turn=seq.turn, step=len(seq.steps) - seq.turn_start))
            seq.step_refs.append(ref)
            if self._turn_over(seq):
                finished.append(b)
        if fwd.hidden:
            width = max(accepted) + 1  # graphs reuse their outputs: keep a copy
            ctx.hidden = {h: v[:, :width].clone() for h, v in fwd.hidden.items()}  # [B, max kept, H]
            ctx.hidden_valid = res.num_accepted + 1
        self.drafter.observe(ctx, Committed(num_accepted=res.num_accepted, accepted=accepted, emitted=emitted))
        clock.mark("other")
        self.step_times.append(clock.take())
        for b in finished:
            seq = self.rows[b]
            self._end_turn(seq)
            if seq.turn < len(seq.prompt.turns):
                self.rows[b] = self._admit(b, seq)
            else:
                self._leave(seq)
                self.rows[b] = self._admit(b, None)
        for b, seq in enumerate(self.rows):
            if seq is None:  # (re)start parked rows from a one-token context, so their state stays bounded
                ctx.history[b] = [self.PARK_TOKEN]
                self.drafter.begin_row(ctx, b)
        self._shrink()

    def _observe_meters(self, res, drafted: list[int]) -> None:
        from spec_kernels.results import DRAFT_STATS, REQUEST_STATS

        cu = 0
        for b, seq in enumerate(self.rows):
            if seq is not None and seq.meter is not None:
                stats = {s: res.stats[s][cu:cu + drafted[b]] for s in DRAFT_STATS if s in res.stats}
                stats.update({s: res.stats[s][b:b + 1] for s in REQUEST_STATS if s in res.stats})
                seq.meter.observe(stats, torch.tensor([0, drafted[b]], device=self.dev),
                                  res.num_accepted[b:b + 1], self.drafter.has_q)
            cu += drafted[b]

    # -- rows joining and leaving
    def _turn_over(self, seq: Seq) -> bool:
        return len(seq.out) >= self.max_new or seq.out[-1] in self.eos

    def _admit(self, b: int, seq: Seq | None) -> Seq | None:
        """Puts work into row b: the next turn of `seq`, or else a waiting prompt; None when none is left."""
        while True:
            if seq is None:
                if not self.queue:
                    return None
                seq = Seq(self.queue.popleft(), joined=self._now(), meter=self.new_meter() if self.new_meter else None)
            if self._start_turn(b, seq):
                if self.ctx is not None:
                    self.ctx.history[b] = seq.history
                    self.ctx.prefill_hidden = self.prefill_hidden[b]
                    self.drafter.begin_row(self.ctx, b)
                return seq
            self._end_turn(seq)  # the turn ended at its first token
            if seq.turn == len(seq.prompt.turns):
                self._leave(seq)
                seq = None

    def _start_turn(self, b: int, seq: Seq) -> bool:
        """Prefills row b with seq's next turn; False when that turn is over at its first token."""
        from harness.runner import prompt_ids

        seq.messages.append({"role": "user", "content": seq.prompt.turns[seq.turn]})
        ids = prompt_ids(self.target.tokenizer, seq.messages)
        if len(ids) + self.max_new + self.k + 2 > self.target.max_len:
            raise UserError(f"prompt {seq.prompt.prompt_id} needs more than --max-len {self.target.max_len} "
                            "cache slots")
        seq.ids, seq.prompt_tokens, seq.turn_start = ids, seq.prompt_tokens + len(ids), len(seq.steps)
        with one_row(self.target, b, empty=True) as row:
            pre = row.prefill(torch.tensor([ids], dtype=torch.long, device=self.dev),
                              hidden_layers=self.drafter.hidden_layers)
            # the first new token is the bonus of an empty chain on the prefill's last row
            first = verify_chain(pre.logits[:, -1:], Proposal(tokens=torch.zeros(1, 0, dtype=torch.long, device=self.dev)),
                                 self.temperature, self.seed, row.lengths, self.verify_backend)
        seq.out = [int(first.emitted[0, 0])]
        seq.history = list(ids) + seq.out
        self.prefill_hidden[b] = pre.hidden
        if seq.meter is not None:
            seq.meter.begin(1)
        return not self._turn_over(seq)

    def _end_turn(self, seq: Seq) -> None:
        if seq.meter is not None:
            # the first token came from the prefill, not from an observed step: it belongs to the context
            rows = seq.meter.flush([seq.out[1:]], [seq.ids + seq.out[:1]])[0]
            for rec, meter_fields in zip(seq.steps[seq.turn_start:], rows):
                rec.update(meter_fields)
        answer = self.target.tokenizer.decode(seq.out, skip_special_tokens=True)
        seq.messages.append({"role": "assistant", "content": answer})
        seq.answers.append(answer)
        seq.outputs.append(seq.out)
        seq.turn += 1

    def _leave(self, seq: Seq) -> None:
        left = self._now()
        self.clock.resolve(self.step_times)  # CUDA events: one sync per finished prompt
        for rec, ref in zip(seq.steps, seq.step_refs):
            rec.update(self.step_times[ref])
        steps = seq.steps
        fields = dict(prompt_tokens=seq.prompt_tokens, new_tokens=sum(len(o) for o in seq.outputs),
                      wall_s=left - seq.joined, turns=seq.answers, output_ids=seq.outputs,
                      steps=len(steps) if steps else None,
                      drafted=sum(s["drafted"] for s in steps) if steps else None,
                      accepted=sum(s["accepted"] for s in steps) if steps else None,
                      joined_s=seq.joined - self.t0, left_s=left - self.t0)
        if self.on_finish is not None:
            self.on_finish(seq.prompt, fields, steps)

    def _shrink(self) -> None:
        """Once no prompt waits: shrinks the batch to the smallest bucket that holds the live rows (live
        rows from the end move into parked rows below it); an empty batch ends the run."""
        if self.queue:
            return
        n = len(self.rows)
        live = [b for b in range(n) if self.rows[b] is not None]
        if not live:
            self.rows = []
            return
        m = min(size for size in self.buckets if size >= len(live))
        if m >= n:
            return
        keep = list(range(m))
        holes = [b for b in range(m) if self.rows[b] is None]
        movers = [b for b in range(m, n) if self.rows[b] is not None]
        for hole, mover in zip(holes, movers):
            keep[hole] = mover
        keep_cache_rows(self.target, keep)
        self.rows = [self.rows[r] for r in keep]
        self.prefill_hidden = [self.prefill_hidden[r] for r in keep]
        if self.ctx is not None:
            self.drafter.keep_rows(keep)
            idx = torch.tensor(keep, dtype=torch.long, device=self.dev)
            self.ctx.history = self._histories()
            self.ctx.hidden = {h: v[idx] for h, v in self.ctx.hidden.items()}
            if self.ctx.hidden_valid is not None:
                self.ctx.hidden_valid = self.ctx.hidden_valid[idx]


# ----------------------------------------------------------------------------- the run (runner branch)

class _Records:
    """Writes steps.jsonl / prompts.jsonl like harness.runner, and batch_runs.jsonl."""

    def __init__(self, out: Path, ar_out: dict, batch_size: int, rank: int, after_prompt):
        self.steps_w, self.prompts_w = JsonlWriter(out / "steps.jsonl"), JsonlWriter(out / "prompts.jsonl")
        self.runs_w = JsonlWriter(out / BATCH_RUNS)
        self.ar_out, self.batch_size, self.rank, self.after_prompt = ar_out, batch_size, rank, after_prompt

    def prompt(self, name: str, p: Prompt, fields: dict, steps: list[dict]) -> None:
        base = dict(drafter=name, prompt_id=p.prompt_id, category=p.category, suite=p.suite, rank=self.rank,
                    batch_size=self.batch_size)
        self.steps_w.write_many({**base, **s} for s in steps)
        if name == "ar":
            self.ar_out[p.prompt_id] = fields["output_ids"]
        diverged = None if name == "ar" or p.prompt_id not in self.ar_out else fields["output_ids"] != self.ar_out[p.prompt_id]
        self.prompts_w.write({**base, **fields, "diverged": diverged})
        if self.after_prompt is not None:
            self.after_prompt()

    def close(self) -> None:
        for w in (self.steps_w, self.prompts_w, self.runs_w):
            w.close()


def run_batched(cfg, target, drafters: dict, prompts: list[Prompt], done: set, ar_out: dict, eos: set[int],
                out: Path, meter=None, rank: int = 0, after_prompt=None) -> Path:
    """harness.runner's path when cfg.batch_size > 1, or cfg.extra holds k_auto or a calibration file:
    per drafter (ar first) resolve K and the prediction (harness.calibrate), warm up, decode the
    unfinished prompts (batch 1: harness.runner.run_prompt), write records. rank and after_prompt as in
    harness.runner.run."""
    from harness.calibrate import plan_for_run
    from harness.runner import run_prompt

    B = cfg.batch_size
    if B > 1:
        for name, drafter in drafters.items():
            check_batchable(name, drafter)
    rec = _Records(out, ar_out, B, rank, after_prompt)
    try:
        for name, drafter in drafters.items():
            todo = [p for p in prompts if (name, p.prompt_id) not in done]
            if not todo:
                continue
            k, prediction = plan_for_run(cfg, target, drafter, name, out)
            dcfg = dataclasses.replace(cfg, k=k)
            bar = tqdm(total=len(todo), desc=f"{name} B={B} K={k}", unit="prompt", dynamic_ncols=True)
            new_tokens = [0]

            def finish(p, fields, steps, name=name, bar=bar, new_tokens=new_tokens):
                rec.prompt(name, p, fields, steps)
                new_tokens[0] += fields["new_tokens"]
                bar.update(1)

            new_meter = _meter_factory(meter, k) if not is_peer(drafter) else None
            if B == 1:
                if cfg.warmup:
                    for p in prompts[:cfg.warmup]:
                        run_prompt(dcfg, target, drafter, p, eos, meter=None, max_new=min(16, cfg.max_new_tokens))
                t0 = _now(target.device)
                for p in todo:
                    fields, steps = run_prompt(dcfg, target, drafter, p, eos, meter=new_meter() if new_meter else None)
                    finish(p, fields, steps)
                wall = _now(target.device) - t0
            else:
                kw = dict(batch_size=B, k=k, temperature=cfg.temperature, seed=cfg.seed, eos_ids=eos,
                          verify_backend=cfg.verify_backend)
                if cfg.warmup:  # one batch of short answers at the run's batch shape, not recorded
                    BatchDecoder(target, drafter, max_new_tokens=min(16, cfg.max_new_tokens), **kw).run(prompts[:B])
                wall = BatchDecoder(target, drafter, max_new_tokens=cfg.max_new_tokens, new_meter=new_meter,
                                    on_finish=finish, **kw).run(todo)
            bar.close()
            rec.runs_w.write(dict(drafter=name, suite=cfg.suite, batch_size=B, k=0 if name == "ar" else k,
                                  k_auto=bool(cfg.extra.get("k_auto")) and name != "ar", prompts=len(todo),
                                  new_tokens=new_tokens[0], wall_s=wall, tok_s_total=_div(new_tokens[0], wall),
                                  **(prediction or {})))
    finally:
        rec.close()
    return out


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _meter_factory(meter, k: int):
    """Fresh batch-1 meters like the run's (each row keeps its own), deep enough for K."""
    if meter is None:
        return None
    kind = type(meter)
    return lambda: kind(meter.device, meter.max_steps, max(k, meter.max_depth), enabled=meter.enabled, base=meter.base)


# ----------------------------------------------------------------------------- summary of batched runs

SUMMARY_COLUMNS = ("drafter", "batch_size", "k", "k_auto", "prompts", "new_tokens", "wall_s", "tok_s_total",
                   "tok_s_seq", "tau", "speedup_total", "speedup_seq", "predicted_tau", "predicted_speedup")


def batch_summary(run_dir: Path) -> pd.DataFrame:
    """One row per (drafter, batch size) from batch_runs.jsonl and the per prompt records:

    tok_s_total    all new tokens / wall time of the batched runs (attempts of a resumed run add up)
    tok_s_seq      per sequence: sum new_tokens / sum wall_s over prompts (join to leave)
    tau            tokens emitted per target forward (bonus included), from the step records
    speedup_total, speedup_seq   the same tok/s over ar's at the same batch size (NaN without ar)
    k, k_auto, predicted_tau, predicted_speedup   K of the last attempt and the cost model's
                   prediction for it (NaN without a calibration)
    A run without batch_runs.jsonl (the plain batch-1 loop) gets tok_s_total = tok_s_seq and k = NaN.
    """
    from harness.reports.summary import load_records, per_prompt

    run_dir = Path(run_dir)
    table = per_prompt(*load_records(run_dir))
    runs = list(read_jsonl(run_dir / BATCH_RUNS))
    if not runs:  # a batch-1 run of the plain loop: its prompts ran one after another
        runs = [dict(drafter=d, batch_size=b, k=math.nan, k_auto=False, new_tokens=g["new_tokens"].sum(),
                     wall_s=g["wall_s"].sum()) for (d, b), g in table.groupby(["drafter", "batch_size"], sort=False)]
    rows = []
    for (drafter, bs), g in pd.DataFrame(runs).groupby(["drafter", "batch_size"], sort=False):
        last = g.iloc[-1]
        mine = table[(table["drafter"] == drafter) & (table["batch_size"] == bs)]
        rows.append(dict(
            drafter=drafter, batch_size=int(bs), k=_num(last["k"]), k_auto=bool(last["k_auto"]),
            prompts=len(mine), new_tokens=int(mine["new_tokens"].sum()), wall_s=float(g["wall_s"].sum()),
            tok_s_total=_div(g["new_tokens"].sum(), g["wall_s"].sum()),
            tok_s_seq=_div(mine["new_tokens"].sum(), mine["wall_s"].sum()),
            tau=_div(mine["emitted"].sum(), mine["steps"].sum()),
            predicted_tau=_num(last.get("predicted_tau")), predicted_speedup=_num(last.get("predicted_speedup")),
        ))
    df = pd.DataFrame(rows)
    ar = df[df["drafter"] == "ar"].set_index("batch_size")
    for col, src in (("speedup_total", "tok_s_total"), ("speedup_seq", "tok_s_seq")):
        base = df["batch_size"].map(ar[src]) if len(ar) else math.nan
        df[col] = df[src] / base
    return df[list(SUMMARY_COLUMNS)]


def format_batch_summary(df: pd.DataFrame) -> str:
    """batch_summary as a table a person reads (summary.md can append it)."""
    from harness.reports.summary import markdown_table

    def num(v, fmt):
        return "n/a" if v is None or not math.isfinite(float(v)) else format(float(v), fmt)

    headers = ["drafter", "batch", "K", "prompts", "tok/s total", "tok/s per seq", "tau", "speedup total",
               "speedup per seq", "predicted tau", "predicted speedup"]
    rows = [[r["drafter"], str(r["batch_size"]), num(r["k"], ".0f") + (" (auto)" if r["k_auto"] else ""), str(r["prompts"]),
             num(r["tok_s_total"], ".1f"), num(r["tok_s_seq"], ".1f"), num(r["tau"], ".2f"),
             num(r["speedup_total"], ".2f") + "x", num(r["speedup_seq"], ".2f") + "x", num(r["predicted_tau"], ".2f"),
             num(r["predicted_speedup"], ".2f") + "x"] for r in df.to_dict("records")]
    return markdown_table(headers, rows)


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else math.nan


def _num(v) -> float:
    return float(v) if v is not None and pd.notna(v) else math.nan
