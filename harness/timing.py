"""Per-step phase timing (draft / verify / accept / other) without host syncs in the loop: CUDA events
on a GPU, read once per prompt; perf_counter on the CPU."""

from __future__ import annotations

import time

import torch

PHASES = ("draft", "verify", "accept", "other")


class PhaseClock:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list[tuple[str, object]] = []
        self._pending: list[list[tuple[str, object]]] = []

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, phase: str) -> None:
        self._marks.append((phase, self._now()))

    def take(self) -> dict[str, float]:
        """Durations of the step just ended, in seconds (on CUDA: resolved later by `resolve`)."""
        marks, self._marks = self._marks, []
        if self.cuda:
            self._pending.append(marks)
            return {f"t_{p}": None for p in PHASES}
        out = {f"t_{p}": 0.0 for p in PHASES}
        for (_, t0), (phase, t1) in zip(marks, marks[1:]):
            out[f"t_{phase}"] += t1 - t0
        return out

    def resolve(self, steps: list[dict]) -> None:
        """Fills the CUDA-timed steps' durations (one sync, at the end of a prompt)."""
        if not self.cuda or not self._pending:
            return
        torch.cuda.synchronize()
        for rec, marks in zip(steps[-len(self._pending):], self._pending):
            for p in PHASES:
                rec[f"t_{p}"] = 0.0
            for (_, e0), (phase, e1) in zip(marks, marks[1:]):
                rec[f"t_{phase}"] += e0.elapsed_time(e1) / 1000.0
        self._pending = []
