"""The fast path (`--fast`): the native target's steps replayed as CUDA graphs.

A small model's decode step is bound by the host, not the GPU (GPU.md: a 1-token forward of SmolLM2
through transformers takes 33.7 ms; reading its weights takes 0.08 ms). A CUDA graph records the kernels
of one forward once and replays them with a single launch. Replays need the same shapes and the same
memory every time, which `NativeTarget(static=True)` provides: attention spans the whole max_len cache
under a boolean mask, so a step's shapes depend only on (B, T), and its forward reads no value back to
the host.

`enable_fast(target)` makes a native target static and wraps it in a `FastTarget` (the same Target
interface). For each step shape, keyed by (B, T, positions given, tree mask given, hidden layers) and the
cache tensors' addresses (harness.engine.scheduler swaps in views of the cache), it keeps one `StepGraph`: static inputs ids [B, T], positions [B, T], tree mask [B, T, T], lengths [B] and
static outputs logits [B, T, V] plus the hidden states asked for. A shape runs eagerly the first
`capture_after - 1` times it is seen (so one-off shapes, such as a draft model's first feed of a whole
prompt, are never captured); then it is warmed up on a side stream, captured, and from then on each step
copies its inputs into the static buffers and replays, with no host synchronisation. Shapes longer than
`max_tokens` and the prefill stay eager. All graphs of a target share one memory pool.

On a CPU there are no graphs: a StepGraph runs the same forward eagerly on its static buffers and copies
the result into its static outputs, so CPU tests exercise the same keys, buffers and output aliasing.

Outputs alias static buffers, and the graphs of one target share a memory pool: a TargetOutput stays
valid until the target's next forward. The decode loop and the drafters consume logits before their next
forward and copy the hidden states they keep.

Modes (`--fast graph|compile|off`; `--fast` alone is graph, `--no-fast` is off):
  graph    the eager forward, captured as above
  compile  the same, but a StepGraph's forward runs each decoder layer through torch.compile (Inductor
           fuses norms, rope, the cache write, softmax and the MLP's gating into a few kernels per layer,
           where eager launches about fifty), and that is what gets captured. The layers share one code
           object, so one compiled graph serves every layer of the target and of a layerskip drafter;
           it is compiled for T = 1, then T = 2, then once more with T dynamic (torch.compile's automatic
           dynamic shapes), for the first batch size and again for the next. Prefill and one-off shapes
           stay eager. On a CPU it is the compiled forward without graphs (tested equal to eager there).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from harness.errors import UserError
from harness.targets.base import Target, TargetOutput, TargetProxy
from harness.targets.native import NativeLM, NativeTarget

MAX_TOKENS = 128  # longest step (T) that gets a graph: covers K + 1 <= 65 and EAGLE trees
CAPTURE_AFTER = 2  # a shape is captured the second time it is seen
WARMUP = 2  # eager runs on a side stream before a capture
MODES = ("graph", "compile")  # what a StepGraph runs (see module docstring); "off" is no fast path at all


def compiled_model(model: NativeLM) -> NativeLM:
    """A NativeLM sharing every weight with `model` whose decoder layers run through torch.compile
    (`model` itself stays eager: the prefill and one-off shapes use it)."""
    shell = copy.copy(model)
    shell._modules = dict(model._modules)  # copy.copy shares the module dict: give the shell its own
    shell.blocks = nn.ModuleList(torch.compile(block, fullgraph=True) for block in model.blocks)
    return shell


class StepGraph:
    """One step shape of a native target: static buffers, and on CUDA the captured forward."""

    def __init__(self, target: NativeTarget, B: int, T: int, has_positions: bool, has_tree: bool,
                 hidden_layers: tuple[int, ...], pool=None, model: NativeLM | None = None):
        dev = target.device
        self.target, self.hidden_layers, self.pool = target, hidden_layers, pool
        self.model = model or target.model  # compile mode: compiled_model(target.model)
        self.ids = torch.zeros(B, T, dtype=torch.long, device=dev)  # [B, T]
        self.positions = torch.zeros(B, T, dtype=torch.long, device=dev) if has_positions else None  # [B, T]
        self.tree_mask = torch.zeros(B, T, T, dtype=torch.bool, device=dev) if has_tree else None  # [B, T, T]
        self.lengths = torch.zeros(B, dtype=torch.long, device=dev)  # [B]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: TargetOutput | None = None

    def _forward(self) -> TargetOutput:
        t = self.target
        committed, t.lengths = t.lengths, self.lengths  # the forward reads lengths from the static buffer
        eager, t.model = t.model, self.model
        try:
            return t.forward(self.ids, self.positions, self.tree_mask, self.hidden_layers)
        finally:
            t.lengths, t.model = committed, eager

    def _capture(self) -> None:
        dev = self.target.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: lazy initialisation happens outside the capture
            for _ in range(WARMUP):
                self._forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.out = self._forward()
        self.graph = graph

    def __call__(self, ids, positions, tree_mask) -> TargetOutput:
        self.ids.copy_(ids)
        if self.positions is not None:
            self.positions.copy_(positions)
        if self.tree_mask is not None:
            self.tree_mask.copy_(tree_mask)
        self.lengths.copy_(self.target.lengths)
        if self.target.device.type == "cuda" and self.graph is None:
            self._capture()  # records only: the replay below computes this step
        return self.replay()

    def replay(self) -> TargetOutput:
        """Runs the step on what the static buffers hold (a bare replay: benchmarks time this alone)."""
        if self.graph is not None:
            self.graph.replay()
            return self.out
        out = self._forward()  # CPU: the same forward, eagerly, with the outputs' aliasing of a replay
        if self.out is None:
            self.out = out
        else:
            self.out.logits.copy_(out.logits)
            for h, v in out.hidden.items():
                self.out.hidden[h].copy_(v)
        return self.out


class FastTarget(TargetProxy):
    """A native target whose steps replay as CUDA graphs (see module docstring). Attributes it does not
    define (name, tokenizer, sizes, device, dtype, max_len, hf_model, ...) are the wrapped target's."""

    def __init__(self, inner: NativeTarget, max_tokens: int = MAX_TOKENS, capture_after: int = CAPTURE_AFTER,
                 mode: str = "graph"):
        if mode not in MODES:
            raise UserError(f"--fast {mode}: choose one of {', '.join(MODES)} or off")
        inner.static = True
        self.inner, self.mode = inner, mode
        self.step_model = compiled_model(inner.model) if mode == "compile" else None
        self.max_tokens, self.capture_after = max_tokens, capture_after
        self.graphs = inner.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.steps: dict[tuple, StepGraph] = {}
        self.seen: dict[tuple, int] = {}
        self.stats = {"eager": 0, "captured": 0, "replayed": 0}  # forwards run eagerly, shapes captured, replays
        self._cache = inner.k_cache

    def reset(self, batch_size: int = 1) -> None:
        self.inner.reset(batch_size)
        if self.inner.k_cache is not self._cache:  # a new cache (other batch size): the graphs point at the old one
            self.steps.clear()
            self.seen.clear()
            self._cache = self.inner.k_cache

    @torch.inference_mode()
    def forward(self, ids, positions=None, tree_mask=None, hidden_layers=()) -> TargetOutput:
        B, T = ids.shape
        k, v = self.inner.k_cache, self.inner.v_cache  # graphs write to the cache they were captured with
        key = (B, T, positions is not None, tree_mask is not None, tuple(hidden_layers),
               k.data_ptr(), v.data_ptr(), k.shape, k.stride())
        step = self.steps.get(key)
        if step is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if T > self.max_tokens or self.seen[key] < self.capture_after:
                self.stats["eager"] += 1
                return self.inner.forward(ids, positions, tree_mask, hidden_layers)
            step = self.steps[key] = StepGraph(self.inner, *key[:5], pool=self.pool, model=self.step_model)
            self.stats["captured"] += 1
        self.stats["replayed"] += 1
        return step(ids, positions, tree_mask)

    @torch.inference_mode()
    def precapture(self, lengths: range, hidden_layers: tuple[int, ...] = ()) -> None:
        """Captures chain steps of these lengths T now (the cache is reset: call it between prompts), so
        that no capture lands inside a timed prompt when a drafter's T varies from step to step."""
        B = self.lengths.shape[0]
        self.reset(B)
        for T in lengths:
            ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
            for _ in range(self.capture_after):  # the writes land in uncommitted slots
                self.forward(ids, hidden_layers=hidden_layers)

    def prefill(self, ids, hidden_layers=()) -> TargetOutput:
        return self.inner.prefill(ids, hidden_layers)  # one per prompt, of the prompt's length: eager

    def commit(self, n: torch.Tensor, n_host: list[int] | None = None) -> None:
        self.inner.commit(n, n_host)

    def commit_path(self, slots, n, n_host: list[int] | None = None) -> None:
        self.inner.commit_path(slots, n, n_host)

    def rollback(self, lengths: torch.Tensor, lengths_host: list[int] | None = None) -> None:
        self.inner.rollback(lengths, lengths_host)


def enable_fast(target: Target, max_tokens: int = MAX_TOKENS, capture_after: int = CAPTURE_AFTER,
                mode: str = "graph") -> Target:
    """Wraps a native target so its steps replay as CUDA graphs (eager on a CPU; same outputs); mode
    "compile" runs the captured steps through torch.compile."""
    if isinstance(target, FastTarget):
        return target
    if not isinstance(target, NativeTarget):
        raise UserError(f"--fast needs the native backend (CUDA graphs need static shapes), not "
                        f"'{target.backend}': pass --no-fast or --backend native")
    return FastTarget(target, max_tokens=max_tokens, capture_after=capture_after, mode=mode)


def enable_fast_drafter(drafter, mode: str = "graph"):
    """Gives a drafter that runs a native model of its own (layerskip, model) the fast path too."""
    model = getattr(drafter, "model", None)
    if isinstance(model, NativeTarget):
        drafter.model = enable_fast(model, mode=mode)
    return drafter


def precapture(target: Target, drafters, k: int) -> None:
    """After a run's warm-up: captures the target's chain steps T = 1 .. k+1 for each drafter's hidden
    layers, and a draft model's T = 1, 2 (a step feeds one or two pending tokens, then drafts one by one)."""
    for drafter in drafters:
        if isinstance(target, FastTarget):
            target.precapture(range(1, k + 2), tuple(getattr(drafter, "hidden_layers", ())))
        model = getattr(drafter, "model", None)
        if isinstance(model, FastTarget):
            model.precapture(range(1, 3))


def resolve_fast(requested: bool | None, target: Target) -> bool:
    """--fast/--no-fast: on by default for a native target on CUDA; --fast on another backend is an error."""
    if requested is None:
        return target.device.type == "cuda" and isinstance(target, NativeTarget)
    if requested and not isinstance(target, (NativeTarget, FastTarget)):
        raise UserError(f"--fast needs the native backend, not '{target.backend}': pass --no-fast or --backend native")
    return bool(requested)


def add_fast_flags(p: argparse.ArgumentParser) -> None:
    """--fast [graph|compile|off] and --no-fast (harness.engine.fast)."""
    p.add_argument("--fast", nargs="?", const="graph", choices=MODES + ("off",), default=None,
                   help="replay the native target's steps as CUDA graphs (default: on for CUDA); compile: "
                        "graphs of torch.compile'd layers; off: eager")
    p.add_argument("--no-fast", dest="fast", action="store_const", const="off", help="the same as --fast off")


def fast_fields(value: str | None) -> dict:
    """RunConfig fields for a --fast value: {} (the default), fast=False, or fast=True and its mode."""
    if value is None:
        return {}
    return {"fast": False} if value == "off" else {"fast": True, "fast_mode": value}
