"""The fast path (harness.engine.fast): same tokens as the plain target through the decode loop, static shapes,
and on CUDA captured graphs that match eager execution."""

import json

import pytest
import torch
from conftest import tiny_model

from harness.engine.scheduler import decode
from harness.drafters.ar import AR
from harness.drafters.base import Drafter
from harness.drafters.model import layerskip
from harness.drafters.ngram import NGram
from harness.errors import UserError
from harness.engine.fast import FastTarget, enable_fast, enable_fast_drafter, precapture, resolve_fast
from harness.targets import build_target
from harness.types import Proposal

PROMPT = list(range(40, 52))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class OracleTree(Drafter):
    """A fixed-shape tree whose main branch follows a reference output (so paths get accepted) and whose
    side branches are wrong: exercises tree verify (positions + tree mask) and commit_path."""

    name = "oracle-tree"
    PARENTS = (-1, 0, 0, 1, 3, 1)
    DEPTH = (0, 1, 1, 2, 3, 2)

    def __init__(self, reference: list[int], prompt_len: int):
        self.ref, self.start = reference, prompt_len

    def propose(self, ctx):
        done = len(ctx.history[0]) - self.start  # tokens emitted so far
        nxt = [self.ref[i] if i < len(self.ref) else 0 for i in range(done, done + 3)]
        wrong = [(t + 1) % 259 for t in nxt]
        tokens = torch.tensor([[0, nxt[0], wrong[0], nxt[1], nxt[2], wrong[1]]], device=ctx.device)
        dev = ctx.device
        return Proposal(tokens=tokens, parents=torch.tensor([self.PARENTS], device=dev),
                        depth=torch.tensor([self.DEPTH], device=dev),
                        num_nodes=torch.tensor([len(self.PARENTS)], device=dev))


def run(target, drafter, n=20, k=3, backend="auto"):
    return decode(target, drafter, PROMPT, max_new_tokens=n, k=k, temperature=0.0, seed=0, eos_ids=set(),
                  verify_backend=backend)


def targets(device="cpu", dtype=torch.float32, max_len=64):
    model = tiny_model().to(device=device, dtype=dtype)
    plain = build_target(model, None, "tiny", "native", max_len=max_len)
    fast = enable_fast(build_target(model, None, "tiny", "native", max_len=max_len))
    return plain, fast


def test_fast_matches_plain_target_for_ar_layerskip_and_trees():
    plain, fast = targets()
    ref = run(plain, AR()).new_ids
    assert run(fast, AR()).new_ids == ref
    assert fast.stats["captured"] >= 1 and fast.stats["replayed"] > fast.stats["captured"]
    skip_fast = enable_fast_drafter(layerskip(fast, 2))
    assert isinstance(skip_fast.model, FastTarget) and skip_fast.model.static
    assert run(plain, layerskip(plain, 2)).new_ids == ref
    assert run(fast, skip_fast).new_ids == ref
    assert skip_fast.model.stats["replayed"] > 0
    tree_plain, tree_fast = run(plain, OracleTree(ref, len(PROMPT))), run(fast, OracleTree(ref, len(PROMPT)))
    assert tree_plain.new_ids == tree_fast.new_ids == ref
    assert max(s["accepted"] for s in tree_fast.steps) == 3  # whole main branch kept: commit_path moved slots
    assert any(k[3] for k in fast.steps)  # a tree-shaped step went through a static step


def test_static_shapes_do_not_change_across_steps():
    """Records the shapes of every tensor the model forward sees, per model and step length T."""
    seen = {}

    def recorder(key):
        def record(_module, args):
            shapes = seen.setdefault(key, {}).setdefault(args[0].shape[1], set())
            shapes.add(tuple(tuple(a.shape) for a in args if torch.is_tensor(a)))
        return record

    for static in (True, False):
        target = build_target(tiny_model(), None, "tiny", "native", max_len=64)
        target = enable_fast(target) if static else target
        drafter = layerskip(target, 2)
        if static:
            drafter = enable_fast_drafter(drafter)
        (target.inner if static else target).model.register_forward_pre_hook(recorder(("target", static)))
        (drafter.model.inner if static else drafter.model).model.register_forward_pre_hook(recorder(("draft", static)))
        run(target, drafter, n=16, k=3)
    for model in ("target", "draft"):
        steps = {t: s for t, s in seen[model, True].items() if t < len(PROMPT)}  # prefill / first feed aside
        assert steps and all(len(s) == 1 for s in steps.values()), steps
    assert len(seen["target", False][4]) > 1  # sanity: without static the attention span grows step by step


def test_outputs_alias_static_buffers_and_reset_drops_steps():
    _, fast = targets()
    fast.prefill(torch.tensor([PROMPT]))
    ids = torch.tensor([[3]])
    first = [fast.forward(ids).logits for _ in range(3)]
    assert first[0] is not first[1] and first[1] is first[2]  # eager once, then the static output
    assert fast.stats == {"eager": 1, "captured": 1, "replayed": 2}
    fast.reset(2)  # a new cache: the steps captured against the old one are dropped
    assert not fast.steps and fast.k_cache.shape[1] == 2




def test_precapture_covers_every_chain_length():
    plain, fast = targets()
    drafter = enable_fast_drafter(layerskip(fast, 2))
    precapture(fast, [drafter, NGram()], k=3)
    assert sorted(key[1] for key in fast.steps) == [1, 2, 3, 4]
    assert sorted(key[1] for key in drafter.model.steps) == [1, 2]
    eager = fast.stats["eager"]
    assert run(fast, NGram()).new_ids == run(plain, NGram()).new_ids  # ngram's T changes from step to step
    assert fast.stats["eager"] == eager  # every step replayed a precaptured shape

def test_steps_are_keyed_by_the_cache_they_write():
    """harness.engine.scheduler swaps in a view of one cache row: a graph captured on one view must not replay on another."""
    _, fast = targets()
    fast.reset(2)
    inner, ids = fast.inner, torch.tensor([[3]])
    k, v, lengths = inner.k_cache, inner.v_cache, inner.lengths
    for b in (0, 1, 0):
        inner.k_cache, inner.v_cache, inner.lengths = k[:, b:b + 1], v[:, b:b + 1], lengths[b:b + 1]
        for _ in range(2):
            fast.forward(ids)
    assert len(fast.steps) == 2 and fast.stats["captured"] == 2

def test_resolve_fast_defaults_and_errors():
    plain, fast = targets()
    assert resolve_fast(None, plain) is False  # CPU: off unless asked
    assert resolve_fast(True, plain) is True
    hf = build_target(tiny_model(), None, "tiny", "hf", max_len=64)
    assert resolve_fast(None, hf) is False
    with pytest.raises(UserError, match="native backend"):
        resolve_fast(True, hf)
    with pytest.raises(UserError, match="native backend"):
        enable_fast(hf)
    assert enable_fast(fast) is fast


def test_run_records_fast(tiny_dir, tmp_path):
    from harness.cli import build_parser
    from harness.run_cli import config_from_args
    from harness.runner import run as run_suite

    args = build_parser().parse_args([
        "run", "--target", str(tiny_dir), "--suite", "calibration", "--limit", "1", "--drafters", "ar,layerskip",
        "--max-new-tokens", "8", "--max-len", "512", "--device", "cpu", "--fast", "--meter", "off", "--warmup", "1",
        "--out", str(tmp_path), "--run-id", "r"])
    out = run_suite(config_from_args(args))
    assert json.loads((out / "config.json").read_text())["fast"] is True
    assert json.loads((out / "env.json").read_text())["fast"] is True
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [p["diverged"] for p in prompts] == [None, False]
    assert config_from_args(build_parser().parse_args(["run", "--no-fast"])).fast is False
    assert config_from_args(build_parser().parse_args(["run", "--fast", "off"])).fast is False
    compiled = config_from_args(build_parser().parse_args(["run", "--fast", "compile", "--meter", "off"]))
    assert (compiled.fast, compiled.fast_mode) == (True, "compile")
    plain_fast = config_from_args(build_parser().parse_args(["run", "--fast"]))
    assert (plain_fast.fast, plain_fast.fast_mode) == (True, "graph")
    assert json.loads((out / "env.json").read_text())["fast_mode"] == "graph"


def test_unknown_fast_mode_is_a_user_error():
    with pytest.raises(UserError, match="--fast eager"):
        enable_fast(targets()[0], mode="eager")


@pytest.mark.slow  # two torch.compile runs of a decoder layer: about a minute on a 2-core CPU
def test_compiled_steps_match_eager():
    """--fast compile: each captured step runs the layers through torch.compile; greedy tokens equal the
    eager target's for ar (T = 1 steps), layerskip (the drafter's own compiled model) and a tree (T = 6,
    positions and tree mask), and the logits of one step match eager to fp32 rounding."""
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_model()
    plain = build_target(model, None, "tiny", "native", max_len=64)
    fast = enable_fast(build_target(model, None, "tiny", "native", max_len=64), mode="compile")
    assert fast.step_model is not fast.inner.model and fast.step_model.blocks[0] is not fast.inner.model.blocks[0]
    ref = run(plain, AR()).new_ids
    assert run(fast, AR()).new_ids == ref
    skip = enable_fast_drafter(layerskip(fast, 2), "compile")
    assert skip.model.mode == "compile"
    assert run(fast, skip).new_ids == ref
    assert run(fast, OracleTree(ref, len(PROMPT))).new_ids == ref
    assert fast.stats["replayed"] > fast.stats["captured"] >= 2
    assert all(s.model is fast.step_model for s in fast.steps.values())  # the steps ran the compiled layers
    static = build_target(model, None, "tiny", "native", max_len=64, static=True)
    for t in (static, fast):
        t.reset(1)
        t.prefill(torch.tensor([PROMPT]))
    ids = torch.tensor([[5, 6, 7, 8]])
    for _ in range(2):  # the second call goes through the compiled StepGraph
        got = fast.forward(ids).logits.clone()
    torch.testing.assert_close(got, static.forward(ids).logits, atol=1e-4, rtol=1e-4)
    assert isinstance(fast.inner.model.blocks[0], type(static.model.blocks[0]))  # the eager model was left alone


@pytest.mark.gpu
@cuda
def test_graphs_match_eager_on_cuda():
    model = tiny_model().to(device="cuda")
    eager = build_target(model, None, "tiny", "native", max_len=64, static=True)
    fast = enable_fast(build_target(model, None, "tiny", "native", max_len=64))
    assert fast.graphs
    for drafter in (lambda t: AR(), lambda t: layerskip(t, 2)):
        ref = run(eager, drafter(eager), backend="torch").new_ids
        got = run(fast, enable_fast_drafter(drafter(fast)), backend="torch").new_ids
        assert got == ref  # same kernels replayed: bitwise the same logits, so the same tokens
    tree_ref = run(eager, OracleTree(ref, len(PROMPT)), backend="torch").new_ids
    assert run(fast, OracleTree(ref, len(PROMPT)), backend="torch").new_ids == tree_ref
    assert fast.stats["captured"] >= 2 and fast.stats["replayed"] > 2 * fast.stats["captured"]
    assert all(s.graph is not None for s in fast.steps.values())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_follows_committed_lengths_on_cuda(dtype):
    plain, fast = targets("cuda", dtype)
    static = build_target(plain.hf_model, None, "tiny", "native", max_len=64, static=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # a wrong length would move the logits by far more
    for t in (static, fast):
        t.prefill(torch.tensor([PROMPT], device="cuda"))
    for step in range(6):  # T = 2 steps keeping 1 or 2 tokens: the graph must read the new lengths each time
        ids = torch.tensor([[step + 3, step + 7]], device="cuda")
        a, b = static.forward(ids).logits.clone(), fast.forward(ids).logits.clone()
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
        keep = torch.tensor([1 + step % 2], device="cuda")
        static.commit(keep)
        fast.commit(keep)
    assert fast.stats == {"eager": 1, "captured": 1, "replayed": 5}


@pytest.mark.gpu
@cuda
def test_static_forward_has_no_host_sync():
    target = build_target(tiny_model().to("cuda"), None, "tiny", "native", max_len=64, static=True)
    target.prefill(torch.tensor([PROMPT], device="cuda"))
    mask = torch.tril(torch.ones(1, 4, 4, dtype=torch.bool, device="cuda"))
    pos = target.lengths[:, None] + torch.tensor([[0, 1, 1, 2]], device="cuda")
    for mode in ("default", "error"):  # the first round may initialise libraries; the second must not sync
        torch.cuda.set_sync_debug_mode(mode)
        try:
            target.forward(torch.ones(1, 1, dtype=torch.long, device="cuda"), hidden_layers=(-1,))
            target.forward(torch.ones(1, 4, dtype=torch.long, device="cuda"), positions=pos, tree_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@cuda
def test_compiled_graphs_match_eager_on_cuda():
    """--fast compile on CUDA: the torch.compile'd layers are captured and replayed (fp32: same tokens)."""
    model = tiny_model().to(device="cuda")
    eager = build_target(model, None, "tiny", "native", max_len=64, static=True)
    fast = enable_fast(build_target(model, None, "tiny", "native", max_len=64), mode="compile")
    ref = run(eager, AR(), backend="torch").new_ids
    assert run(fast, AR(), backend="torch").new_ids == ref
    assert run(fast, OracleTree(ref, len(PROMPT)), backend="torch").new_ids == ref
    assert fast.stats["captured"] >= 2 and all(s.graph is not None for s in fast.steps.values())


def eagle3_through_fast(device: str, dtype: torch.dtype) -> None:
    """A random eagle3 head (reduced draft vocabulary, chain and tree) drafting for the fast target decodes
    what it decodes for the same target without the fast path, and what ar decodes."""
    from test_eagle import random_head

    from harness.drafters.eagle import EagleDrafter, TreeShape

    model = tiny_model().to(device=device, dtype=dtype)
    eager = build_target(model, None, "tiny", "native", max_len=128, static=True)
    fast = enable_fast(build_target(model, None, "tiny", "native", max_len=128))
    head, frozen = random_head(eager, "eagle3", draft_vocab=100)
    head = head.to(device=device, dtype=dtype)
    ref = run(eager, AR(), n=24, backend="torch").new_ids
    for tree in (None, TreeShape(depth=3, top_k=2, total_tokens=6)):
        got_eager = run(eager, EagleDrafter(head, frozen, "eagle3", tree, 128, eager.device), n=24, backend="torch")
        got_fast = run(fast, EagleDrafter(head, frozen, "eagle3", tree, 128, fast.device), n=24, backend="torch")
        assert got_fast.new_ids == got_eager.new_ids, tree
        if dtype == torch.float32:
            assert got_fast.new_ids == ref, tree
    assert fast.stats["replayed"] > 0


def test_eagle3_through_the_fast_path():
    eagle3_through_fast("cpu", torch.float32)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eagle3_through_the_fast_path_on_cuda(dtype):
    eagle3_through_fast("cuda", dtype)
