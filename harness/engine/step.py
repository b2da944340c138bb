"""The speculative loop for one prompt: draft -> verify forward -> accept -> commit -> observe.

`ar` goes through the same loop with zero drafts, so every figure is measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.drafters.base import Committed, DraftContext, Drafter
from harness.timing import PhaseClock
from harness.engine.verify import verify_chain, verify_tree


@dataclass
class Decoded:
    new_ids: list[int]
    steps: list[dict] = field(default_factory=list)  # per target forward: drafted, depth, accepted, emitted, t_*


def tree_mask(parents: torch.Tensor) -> torch.Tensor:
    """[B, T] parent indices -> [B, T, T] bool: node t sees itself and its ancestors."""
    B, T = parents.shape
    mask = torch.eye(T, dtype=torch.bool, device=parents.device).expand(B, T, T).clone()
    for t in range(1, T):  # parents precede children, so row t = row of its parent + itself
        p = parents[:, t].clamp(min=0)
        mask[:, t] |= mask[torch.arange(B, device=parents.device), p] & (parents[:, t] >= 0)[:, None]
    return mask


@torch.inference_mode()
def decode(target, drafter: Drafter, prompt_ids: list[int], *, max_new_tokens: int, k: int,
           temperature: float, seed: int, eos_ids: set[int], verify_backend: str = "auto",
           meter=None, clock: PhaseClock | None = None) -> Decoded:
    dev = target.device
    clock = clock or PhaseClock(dev)
    target.reset(1)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
    pre = target.prefill(ids, hidden_layers=drafter.hidden_layers)
    # the first new token is the bonus of an empty chain on the prefill's last row
    first = verify_chain(pre.logits[:, -1:], _empty(dev), temperature, seed, target.lengths, verify_backend)
    out_ids = [int(first.emitted[0, 0])]
    ctx = DraftContext(history=[list(prompt_ids) + out_ids], k=k, temperature=temperature, seed=seed, device=dev,
                       hidden={h: v[:, -1:] for h, v in pre.hidden.items()},
                       hidden_valid=torch.ones(1, dtype=torch.long, device=dev))
    ctx.prefill_hidden = pre.hidden
    drafter.begin(ctx)
    if meter is not None:
        meter.begin(1)
    result = Decoded(new_ids=out_ids)
    while len(out_ids) < max_new_tokens and out_ids[-1] not in eos_ids:
        clock.start()
        prop = drafter.propose(ctx)  # draft
        clock.mark("draft")
        last = torch.tensor([[ctx.history[0][-1]]], dtype=torch.long, device=dev)
        if prop.is_tree:
            tokens = prop.tokens.clone()
            tokens[:, 0] = last[:, 0]
            positions = target.lengths[:, None] + prop.depth
            fwd = target.forward(tokens, positions=positions, tree_mask=tree_mask(prop.parents),
                                 hidden_layers=drafter.hidden_layers)  # verify
            clock.mark("verify")
            res = verify_tree(fwd.logits, prop, temperature, seed, target.lengths + 1, verify_backend)
            n_acc = int(res.num_accepted[0])  # the one host read of the step
            target.commit_path(res.path[:, :n_acc + 1].clamp(min=0), res.num_accepted + 1)
            kept_rows = res.path[:, :n_acc + 1].clamp(min=0)
            drafted = int(prop.num_nodes[0]) - 1 if prop.num_nodes is not None else prop.tokens.shape[1] - 1
            depth = int(prop.depth.max())
        else:
            fwd = target.forward(torch.cat([last, prop.tokens], 1), hidden_layers=drafter.hidden_layers)  # verify
            clock.mark("verify")
            res = verify_chain(fwd.logits, prop, temperature, seed, target.lengths + 1, verify_backend)
            n_acc = int(res.num_accepted[0])  # the one host read of the step
            target.commit(res.num_accepted + 1)  # rollback = keep last + accepted drafts (a pointer move)
            kept_rows = torch.arange(n_acc + 1, device=dev)[None]
            drafted = prop.tokens.shape[1] if prop.num_draft is None else int(prop.num_draft[0])
            depth = drafted
        emitted = res.emitted[0, :n_acc + 1].tolist()
        clock.mark("accept")
        if meter is not None:
            meter.observe(res.stats, None if prop.is_tree else res.stats["cu_num_draft"], res.num_accepted,
                          drafter.has_q)
        room = max_new_tokens - len(out_ids)
        emitted = _cut(emitted[:room], eos_ids)
        out_ids.extend(emitted)
        ctx.history[0].extend(emitted)
        ctx.hidden = {h: v.index_select(1, kept_rows[0]) for h, v in fwd.hidden.items()}
        ctx.hidden_valid = torch.tensor([n_acc + 1], device=dev)
        drafter.observe(ctx, Committed(num_accepted=res.num_accepted, accepted=[n_acc],
                                       emitted=[res.emitted[0, :n_acc + 1].tolist()], path=res.path))
        clock.mark("other")
        result.steps.append(dict(drafted=drafted, depth=depth, accepted=n_acc, emitted=len(emitted),
                                 **clock.take()))
    return result


def flush_meter(meter, prompt_ids: list[int], new_ids: list[int]) -> list[dict]:
    """The meter's per-step fields for a decoded prompt (one host transfer; call it outside timed code).
    The first new token came from the prefill, not from an observed step: it is context for the meter."""
    return meter.flush([new_ids[1:]], [list(prompt_ids) + new_ids[:1]])[0]


def _empty(dev):
    from harness.types import Proposal
    return Proposal(tokens=torch.zeros(1, 0, dtype=torch.long, device=dev))


def _cut(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1]
    return tokens
