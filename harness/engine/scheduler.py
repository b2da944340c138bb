"""Continuous batching over the engine's step: rows are admitted, take their turns, finish and leave.

`Scheduler(target, drafter, batch_size=B, ...).run(prompts)` decodes prompts B rows at a time; B = 1 is
the same code. Each step (harness.engine.step) proposes for every row, verifies them in one forward and
commits per row. When a row's turn ends (EOS or max_new_tokens) the row takes that prompt's next turn,
or else the next waiting prompt: the target prefills that row alone (`prefill_row`, the other rows keep
their state) and the drafter hears `begin_row(ctx, b)`. When no prompt waits, finished rows are parked
(they ride along with a one-token context and commit nothing) until the live rows fit the next smaller
bucket (B, then powers of two), then the batch shrinks (`keep_rows` on the target and the drafter), so
step shapes take a few batch sizes only (few CUDA graphs).

Timing: a prompt's wall_s runs from joining the batch to leaving it, minus the untimed work done in
between (chat templating, detokenising, the meter's bookkeeping and writing records), which the
transformers peers do not do inside their timed `generate` either. The meter's stats are kept on the
device during the turn and observed when the turn ends, outside the timed region; those the CPU
reference defers (harness.engine.verify.DeferredStats, temperature 0) are computed right after their
step, untimed.

Failures: a row whose logits turn NaN/inf, or a step that raises (anything but a user error), fails the
prompts involved with a one-line reason (`on_fail`); the others go on (after a crash the batch restarts
with the prompts still waiting).

Step records (harness.records): drafted, depth, accepted, emitted, cut, turn, step and the phase times of
the step the row took part in; they count what was emitted: a step cut at EOS or at max_new_tokens after
m tokens records emitted = m, accepted = min(accepted, m) and (chains) drafted = min(drafted, m).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from harness.drafters.base import DraftContext, Drafter
from harness import seeds
from harness.engine.step import Engine
from harness.engine.verify import DeferredStats, verify_chain
from harness.errors import UserError
from harness.suites import Prompt
from harness.targets.chat import prompt_ids
from harness.timing import PhaseClock
from harness.types import Proposal

PARK_TOKEN = 0  # the context of a parked row


@dataclass
class Seq:
    """A prompt in the batch; its turns run one after another in its row."""

    prompt: Prompt
    joined: float  # clock when it joined
    untimed0: float  # the scheduler's untimed total when it joined
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
    observed: list[tuple] = field(default_factory=list)  # this turn's verifier stats, for the meter


class Scheduler:
    """See the module docstring. on_finish(prompt, fields, steps) as each prompt leaves; on_fail(prompt,
    reason, fields) when one fails. encode(seq) -> prompt ids of the turn (default: the chat template)."""

    def __init__(self, target, drafter: Drafter, *, name: str, batch_size: int, max_new_tokens: int, k: int,
                 temperature: float, seed: int, eos_ids: set[int], verify_backend: str = "auto",
                 new_meter=None, on_finish=None, on_fail=None, encode=None, catch: bool = True,
                 clock: PhaseClock | None = None):
        self.target, self.drafter, self.name = target, drafter, name
        self.batch_size, self.max_new, self.k = batch_size, max_new_tokens, k
        self.temperature, self.seed, self.eos = temperature, seed, eos_ids
        self.verify_backend = verify_backend
        self.new_meter = new_meter  # () -> a fresh batch-1 meter, or None
        self.on_finish, self.on_fail = on_finish, on_fail
        self.catch = catch  # False: a crash propagates (tests)
        self.encode = encode or (lambda seq: prompt_ids(target.tokenizer, seq.messages))
        self.dev = target.device
        self.clock = clock or PhaseClock(self.dev)
        self.engine = Engine(target, drafter, temperature, verify_backend, self.clock, stats=new_meter is not None)
        self.buckets = sorted({batch_size} | {2 ** i for i in range(batch_size.bit_length()) if 2 ** i < batch_size})

    # -- the run
    @torch.inference_mode()
    def run(self, prompts: list[Prompt]) -> float:
        """Decodes every prompt; returns the timed wall time of the whole batched run (seconds)."""
        self.queue = deque(prompts)
        wall = 0.0
        while self.queue:
            self.rows: list[Seq | None] = []
            self.admitting: Seq | None = None
            t0, self.untimed = self._now(), 0.0
            try:
                self._run_once()
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - a drafter's or target's crash fails its prompts only
                if not self.catch:
                    raise
                reason = _one_line(err)
                involved = {id(s): s for s in self.rows + [self.admitting] if s is not None}
                for seq in involved.values():
                    self._fail(seq, reason)
            wall += self._now() - t0 - self.untimed
        return wall

    def _run_once(self) -> None:
        n = min(self.batch_size, len(self.queue))
        self.target.reset(n)
        self.rows = [None] * n
        self.step_times: list[dict] = []
        self.keys = {"verify": [0] * n, "draft": [0] * n}
        self.ctx = DraftContext(history=[[PARK_TOKEN] for _ in range(n)], k=self.k, temperature=self.temperature,
                                seed=self.seed, device=self.dev, hidden={},
                                hidden_valid=torch.ones(n, dtype=torch.long, device=self.dev),
                                want_q=self.temperature > 0 or self.engine.stats)
        self._push_keys()
        self.drafter.begin(self.ctx)
        for b in range(n):
            self.rows[b] = self._admit(b, None)
        self._shrink()
        while self.rows:
            self._step()

    def _now(self) -> float:
        return _now(self.dev)

    def _push_keys(self) -> None:
        self.ctx.verify_keys = torch.tensor(self.keys["verify"], dtype=torch.long, device=self.dev)
        self.ctx.draft_keys = torch.tensor(self.keys["draft"], dtype=torch.long, device=self.dev)

    # -- one step of the whole batch
    def _step(self) -> None:
        live = [s is not None for s in self.rows]
        room = [self.max_new - len(s.out) if s is not None else 0 for s in self.rows]
        out = self.engine.step(self.ctx, live, room, self.eos)
        ref = len(self.step_times)
        self.step_times.append(self.clock.take())
        if isinstance(out.stats, DeferredStats):  # the meter's statistics, outside the timed region
            t = self._now()
            out.stats.materialize()
            self.untimed += self._now() - t
        finished, failed = [], []
        offset = 0
        for b, seq in enumerate(self.rows):
            drafted = out.drafted[b]
            if seq is None:
                offset += drafted
                continue
            kept = out.emitted[b]
            if out.error[b] or not kept:  # (a correct verifier always emits a token)
                failed.append(b)
                offset += drafted
                continue
            m = len(kept)
            cut = m <= out.accepted[b]
            seq.out.extend(kept)  # (the engine extended seq.history, which is ctx.history[b])
            seq.steps.append(dict(
                drafted=min(drafted, m) if cut and not out.is_tree else drafted,
                depth=min(out.depth[b], m) if cut else out.depth[b], accepted=min(out.accepted[b], m), emitted=m,
                cut=cut, turn=seq.turn, step=len(seq.steps) - seq.turn_start))
            seq.step_refs.append(ref)
            if seq.meter is not None:
                seq.observed.append((out.stats, b, offset, drafted, out.is_tree, out.num_accepted))
            offset += drafted
            if len(seq.out) >= self.max_new or seq.out[-1] in self.eos:
                finished.append(b)
        for b in failed:
            seq = self.rows[b]
            what = "NaN or inf in the target's logits" if out.error[b] else "verification emitted no token"
            self._fail(seq, f"{what} (turn {seq.turn + 1}, step {len(seq.steps) - seq.turn_start + 1})")
            self.rows[b] = self._admit(b, None)
        for b in finished:
            seq = self.rows[b]
            self._end_turn(seq)
            self.rows[b] = self._admit(b, seq if seq.turn < len(seq.prompt.turns) else self._leave(seq))
        for b, seq in enumerate(self.rows):
            if seq is None:  # (re)start parked rows from a one-token context, so their state stays bounded
                self._park(b)
        self._shrink()

    # -- rows joining and leaving
    def _admit(self, b: int, seq: Seq | None) -> Seq | None:
        """Puts work into row b: the next turn of `seq`, or else a waiting prompt; None (parked) when none
        is left."""
        while True:
            if seq is None:
                if not self.queue:
                    self._park(b)
                    return None
                seq = Seq(self.queue.popleft(), joined=self._now(), untimed0=self.untimed,
                          meter=self.new_meter() if self.new_meter else None)
            self.admitting = seq
            state = self._start_turn(b, seq)
            self.admitting = None
            if state == "running":
                return seq
            if state == "failed":
                seq = None
            elif seq.turn == len(seq.prompt.turns):  # the last turn ended at its first token
                seq = self._leave(seq)

    def _park(self, b: int) -> None:
        self.ctx.history[b] = [PARK_TOKEN]
        self.target.prefill_row(b, torch.zeros(1, 0, dtype=torch.long, device=self.dev))
        self.ctx.prefill_hidden = {}
        self.drafter.begin_row(self.ctx, b)

    def _start_turn(self, b: int, seq: Seq) -> str:
        """Prefills row b with seq's next turn: "running", "over" (it ended at its first token) or
        "failed"."""
        t = self._now()
        seq.messages.append({"role": "user", "content": seq.prompt.turns[seq.turn]})
        ids = self.encode(seq)
        self.untimed += self._now() - t
        if len(ids) + self.max_new + self.k + 2 > self.target.max_len:
            raise UserError(f"prompt {seq.prompt.prompt_id} needs more than --max-len {self.target.max_len} "
                            "cache slots")
        seq.ids, seq.prompt_tokens, seq.turn_start = ids, seq.prompt_tokens + len(ids), len(seq.steps)
        for stream in ("verify", "draft"):
            self.keys[stream][b] = seeds.row_key(self.seed, seq.prompt.prompt_id, seq.turn, self.name, stream)
        self._push_keys()
        pre = self.target.prefill_row(b, torch.tensor([ids], dtype=torch.long, device=self.dev),
                                      hidden_layers=self.drafter.hidden_layers)
        # the first new token is the bonus of an empty chain on the prefill's last row
        empty = Proposal(tokens=torch.zeros(1, 0, dtype=torch.long, device=self.dev), num_draft_host=[0])
        first = verify_chain(pre.logits[:, -1:], empty, self.temperature, self.ctx.verify_keys[b:b + 1],
                             torch.tensor([len(ids)], device=self.dev), self.verify_backend)
        tok, err = torch.cat([first.emitted[0, :1], first.error[:1].long()]).tolist()
        seq.out = [tok]
        seq.history = list(ids) + seq.out
        if err:
            self._fail(seq, f"NaN or inf in the target's logits (turn {seq.turn + 1}, prefill)")
            return "failed"
        self.ctx.history[b] = seq.history
        self.ctx.prefill_hidden = pre.hidden
        self.drafter.begin_row(self.ctx, b)
        if seq.meter is not None:
            seq.meter.begin(1)
        if len(seq.out) >= self.max_new or seq.out[-1] in self.eos:
            self._end_turn(seq)
            return "over"
        return "running"

    def _end_turn(self, seq: Seq) -> None:
        t = self._now()
        if seq.meter is not None:
            _observe(seq, self.drafter.has_q)
            # the first token came from the prefill, not from an observed step: it belongs to the context
            rows = seq.meter.flush([seq.out[1:]], [seq.ids + seq.out[:1]])[0]
            for rec, meter_fields in zip(seq.steps[seq.turn_start:], rows):
                rec.update(meter_fields)
        tok = self.target.tokenizer
        answer = tok.decode(seq.out, skip_special_tokens=True) if tok is not None else ""
        seq.messages.append({"role": "assistant", "content": answer})
        seq.answers.append(answer)
        seq.outputs.append(seq.out)
        seq.turn += 1
        self.untimed += self._now() - t

    def _fields(self, seq: Seq, left: float) -> dict:
        steps = seq.steps
        return dict(prompt_tokens=seq.prompt_tokens, new_tokens=sum(len(o) for o in seq.outputs),
                    wall_s=left - seq.joined - (self.untimed - seq.untimed0), turns=seq.answers,
                    output_ids=seq.outputs, steps=len(steps) if steps else None,
                    drafted=sum(s["drafted"] for s in steps) if steps else None,
                    accepted=sum(s["accepted"] for s in steps) if steps else None)

    def _leave(self, seq: Seq) -> None:
        left = self._now()
        self.clock.resolve(self.step_times)  # CUDA events: one sync per finished prompt
        for rec, ref in zip(seq.steps, seq.step_refs):
            rec.update(self.step_times[ref])
        fields = self._fields(seq, left)
        t = self._now()
        if self.on_finish is not None:
            self.on_finish(seq.prompt, fields, seq.steps)
        self.untimed += self._now() - t
        return None

    def _fail(self, seq: Seq, reason: str) -> None:
        t = self._now()
        if self.on_fail is not None:
            self.on_fail(seq.prompt, reason, self._fields(seq, t))
        self.untimed += self._now() - t

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
        self.target.keep_rows(keep)
        self.drafter.keep_rows(keep)
        self.rows = [self.rows[r] for r in keep]
        self.keys = {s: [v[r] for r in keep] for s, v in self.keys.items()}
        self._push_keys()
        idx = torch.tensor(keep, dtype=torch.long, device=self.dev)
        ctx = self.ctx
        ctx.history = [ctx.history[r] for r in keep]
        ctx.hidden = {h: v[idx] for h, v in ctx.hidden.items()}
        if ctx.hidden_valid is not None:
            ctx.hidden_valid = ctx.hidden_valid[idx]


def _observe(seq: Seq, has_q: bool) -> None:
    """Feeds the turn's kept verifier stats to the row's (batch-1) meter, outside the timed region."""
    from spec_kernels.results import DRAFT_STATS, REQUEST_STATS

    for stats, b, offset, drafted, is_tree, num_accepted in seq.observed:
        if is_tree:
            row = {s: v[b:b + 1] for s, v in stats.items() if torch.is_tensor(v) and v.dim() >= 1}
            seq.meter.observe(row, None, num_accepted[b:b + 1], has_q)
        else:
            row = {s: stats[s][offset:offset + drafted] for s in DRAFT_STATS if s in stats}
            row.update({s: stats[s][b:b + 1] for s in REQUEST_STATS if s in stats})
            seq.meter.observe(row, torch.tensor([0, drafted], device=num_accepted.device), num_accepted[b:b + 1],
                              has_q)
    seq.observed = []


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text}"[:300]


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Decoded:
    new_ids: list[int]
    steps: list[dict] = field(default_factory=list)


def decode(target, drafter: Drafter, prompt_ids: list[int], *, max_new_tokens: int, k: int, temperature: float,
           seed: int, eos_ids: set[int], verify_backend: str = "auto", meter=None, name: str | None = None,
           prompt_id="0", clock: PhaseClock | None = None) -> Decoded:
    """One single-turn prompt of ready ids through the scheduler at batch 1 (tests, calibration, profile)."""
    result = {}

    def finish(_p, fields, steps):
        result.update(new_ids=fields["output_ids"][0], steps=steps)

    def fail(_p, reason, _fields):
        raise RuntimeError(reason)

    sched = Scheduler(target, drafter, name=name or getattr(drafter, "name", "drafter"), batch_size=1,
                      max_new_tokens=max_new_tokens, k=k, temperature=temperature, seed=seed, eos_ids=eos_ids,
                      verify_backend=verify_backend, new_meter=(lambda: meter) if meter is not None else None,
                      on_finish=finish, on_fail=fail, encode=lambda _seq: list(prompt_ids), catch=False,
                      clock=clock)
    sched.run([Prompt(prompt_id=prompt_id, category="default", turns=[""], suite="ids")])
    return Decoded(new_ids=result["new_ids"], steps=result["steps"])
