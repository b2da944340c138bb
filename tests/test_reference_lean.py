"""The torch reference verifier's lean path (stats=False with every request greedy: argmax comparisons only,
what a CPU run without the meter takes) decides exactly what the full path decides."""

import pytest
import torch

from spec_kernels import verify_chain, verify_tree
from spec_kernels.testing import random_chain, random_tree


def _nan_row(logits: torch.Tensor, row: int) -> torch.Tensor:
    logits = logits.clone()
    logits.view(-1, logits.shape[-1])[row, 3] = float("nan")
    return logits


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_q", [False, True])
def test_lean_chain_decides_as_the_full_path(seed, with_q):
    gen = torch.Generator().manual_seed(seed)
    prob = random_chain([3, 0, 5, 1, 4], 64, with_q=with_q, temperature=0.0, gen=gen, accept_bias=0.7)
    args = list(prob.args())
    if seed % 2:
        args[0] = _nan_row(args[0], 5)  # a NaN in request 2's rows: that request errors
    full = verify_chain(*args, backend="torch")
    lean = verify_chain(*args, backend="torch", stats=False)
    for name in ("emitted", "num_accepted", "error"):
        assert torch.equal(getattr(lean, name), getattr(full, name)), name
    assert lean.stats == {} and full.stats
    assert bool(full.num_accepted.gt(0).any())  # the problem gets drafts accepted


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_q", [False, True])
def test_lean_tree_decides_as_the_full_path(seed, with_q):
    gen = torch.Generator().manual_seed(seed)
    prob = random_tree(6, 9, 32, with_q=with_q, temperature=0.0, gen=gen, accept_bias=0.7)
    args = list(prob.args())
    if seed % 2:
        args[0] = _nan_row(args[0], 9 + 2)  # request 1, node 2
    full = verify_tree(*args, backend="torch")
    lean = verify_tree(*args, backend="torch", stats=False)
    for name in ("path", "emitted", "num_accepted", "error"):
        assert torch.equal(getattr(lean, name), getattr(full, name)), name
    assert lean.stats == {} and full.stats
    assert bool(full.num_accepted.gt(1).any())  # some request walks past depth 1


def test_a_sampled_request_keeps_the_full_path():
    """stats=False only drops the statistics' work when every request is greedy: a batch with one sampled
    request decides as with stats."""
    prob = random_chain([2, 3], 32, with_q=True, temperature=[0.0, 1.0])
    full = verify_chain(*prob.args(), backend="torch")
    lean = verify_chain(*prob.args(), backend="torch", stats=False)
    assert torch.equal(lean.emitted, full.emitted) and lean.stats.keys() == full.stats.keys()


def test_lean_tree_takes_the_first_matching_sibling():
    """Two siblings with the same (argmax) token: both paths accept the first in index order, and walk on
    below it (its child matches too), not below the second."""
    V = 8
    logits = torch.zeros(1, 4, V)
    logits[0, 0, 5] = logits[0, 1, 6] = logits[0, 2, 7] = logits[0, 3, 1] = 3.0  # argmax per node row
    tokens = torch.tensor([[0, 5, 5, 6]])  # nodes 1 and 2: the root's children (both 5); node 3: child of 1
    parents = torch.tensor([[-1, 0, 0, 1]])
    args = (logits, tokens, parents, torch.tensor([4]), None, torch.zeros(1), torch.zeros(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long))
    full = verify_tree(*args, backend="torch")
    lean = verify_tree(*args, backend="torch", stats=False)
    assert full.path.tolist() == [[0, 1, 3]] and full.emitted.tolist() == [[5, 6, 1]]
    assert torch.equal(lean.path, full.path) and torch.equal(lean.emitted, full.emitted)


def test_the_meter_reads_deferred_statistics_equal_to_inline_ones():
    """At T = 0 on the torch reference the engine decides lean and the statistics come later
    (harness.engine.verify.DeferredStats): the meter's per-step fields equal those of a run whose
    statistics are computed inline (Triton's behaviour), and the decoded tokens too."""
    import json

    from conftest import byte_tokenizer, tiny_model
    from test_engine import prompts

    from harness.drafters.model import ARDraftModel
    from harness.drafters.ngram import NGram
    from harness.engine import verify
    from harness.engine.scheduler import Scheduler
    from harness.meter.core import build_meter
    from harness.config import RunConfig
    from harness.targets import build_target

    target = build_target(tiny_model(), byte_tokenizer(), "tiny", "native", max_len=320)
    draft = build_target(tiny_model(layers=1, seed=3), byte_tokenizer(), "draft", "native", max_len=320)

    def run(make):
        got = {}
        Scheduler(target, make(), name="d", batch_size=2, max_new_tokens=12, k=3, temperature=0.0, seed=0,
                  eos_ids=set(), catch=False, new_meter=lambda: build_meter(RunConfig(meter=True, k=3), target),
                  on_finish=lambda p, f, st: got.setdefault(p.prompt_id, (f["output_ids"], st))).run(prompts()[:3])
        return got

    for make in (NGram, lambda: ARDraftModel(draft, "model")):  # q one-hot, and a q of its own
        deferred = run(make)
        real = verify._deferred
        try:
            verify._deferred = lambda *a: False  # inline statistics
            inline = run(make)
        finally:
            verify._deferred = real
        assert deferred.keys() == inline.keys()
        for pid in deferred:
            assert deferred[pid][0] == inline[pid][0]
            a, b = deferred[pid][1], inline[pid][1]
            assert len(a) == len(b) and all("h_verify" in s for s in a)
            for sa, sb in zip(a, b):
                for key in set(sa) - {"t_draft", "t_verify", "t_accept", "t_other"}:
                    assert json.dumps(sa[key]) == json.dumps(sb[key]), (pid, key)
