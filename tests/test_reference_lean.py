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
