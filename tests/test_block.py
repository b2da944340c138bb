"""The block drafter: lossless at temperature 0, one head forward for drafts 2..K, and its q equals the
training unroll's (so what train-head --variant block trains is what drafts)."""

import pytest
import torch
from conftest import tiny_model
from test_eagle import one_layer_model, reference_q, run

from harness.config import RunConfig
from harness.drafters import build_drafter
from harness.drafters.ar import AR
from harness.drafters.block import BlockDrafter, init_block
from harness.drafters.heads import Frozen, config_for_target, save_head
from harness.errors import UserError
from harness.targets import build_target


def random_block(target, scale=4.0, draft_vocab=100):
    frozen = Frozen.of(target)
    head = init_block(config_for_target(target, "block", draft_vocab), frozen, 1)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return head.eval().requires_grad_(False), frozen


@pytest.mark.parametrize("k", [1, 4])
def test_block_equals_ar_at_temperature_zero(k):
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    head, frozen = random_block(target)
    ref = run(target, AR(), k=k).new_ids
    assert run(target, BlockDrafter(head, frozen, "block", 256, target.device), k=k).new_ids == ref


class Recording(BlockDrafter):
    def propose(self, ctx):
        ctx.want_q = True  # q is what these tests compare
        prop = super().propose(ctx)
        self.log.append((list(ctx.history[0]), prop))
        return prop

    def _run_queries(self, *a, **kw):
        self.query_calls += 1
        return super()._run_queries(*a, **kw)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_block_q_equals_training_unroll(temperature):
    model = one_layer_model(0.3)
    target = build_target(model, None, "tiny", "native", max_len=256)
    head, frozen = random_block(target, scale=6.0)
    drafter = Recording(head, frozen, "block", 256, target.device)
    drafter.log, drafter.query_calls = [], 0
    out = run(target, drafter, n=24, k=4, temperature=temperature)
    assert drafter.query_calls == len(out.steps)  # one head forward per step for drafts 2..K
    for history, prop in drafter.log[1::3]:
        for j in range(prop.tokens.shape[1]):
            ref = reference_q(target, head, frozen, history, [0] * j, temperature)  # block queries ignore drafts
            torch.testing.assert_close(prop.q[0, j], ref, atol=2e-5, rtol=0)


def test_block_drafter_is_built_from_a_head_folder(tmp_path):
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    with pytest.raises(UserError, match="--variant block"):
        build_drafter("block", target, RunConfig(target="tiny"))
    head, _ = random_block(target)
    save_head(head, tmp_path / "b")
    drafter = build_drafter("block", target, RunConfig(target="tiny", head=str(tmp_path / "b")))
    assert isinstance(drafter, BlockDrafter)
    assert run(target, drafter).new_ids == run(target, AR()).new_ids
