"""Data passed between the runner, drafters, verification and meters.

Shapes: B = sequences in the batch, K = max draft tokens in a chain, T = nodes of a draft tree
(node 0 is the root: the last emitted token, which is not a draft), V = vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Proposal:
    """What a drafter proposes for one step.

    Chain: tokens [B, K] (padded), num_draft [B] (ragged length <= K; 0 = nothing to propose).
    Tree: tokens [B, T] with tokens[:, 0] = the root (last emitted token), parents [B, T] (-1 for the
    root and for padding), num_nodes [B]; depth [B, T] (root 0).
    q: the drafter's distribution that each draft token was drawn from, or None (one-hot drafter).
       chain: [B, K, V], q[b, j] is the distribution of tokens[b, j];
       tree:  [B, T, V], q[b, n] is the distribution the children of node n were drawn from.
    num_draft_host: num_draft as a host list, when the drafter computed it on the host (ngram): ragged
       chains then need no device read.
    bounds: trees only, (max depth, max children of a node) over the batch, host ints known from the
       tree's shape; the engine passes them to the verifier so that it reads nothing back.
    """

    tokens: torch.Tensor
    num_draft: torch.Tensor | None = None
    q: torch.Tensor | None = None
    parents: torch.Tensor | None = None
    num_nodes: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    num_draft_host: list[int] | None = None
    bounds: tuple[int, int] | None = None

    @property
    def is_tree(self) -> bool:
        return self.parents is not None


@dataclass
class VerifyOutput:
    """What verification returns for one step (chain or tree), on the device.

    emitted [B, Kmax+1] int64 padded with -1: accepted drafts then the recovered or bonus token.
    num_accepted [B] int64.
    path [B, Dmax+1] int64 (trees only): accepted node indices, path[:, 0] = 0 (root), padded -1.
    error [B] bool: NaN/inf in the target logits of that request.
    stats: per committed depth quantities for the meter (see spec_kernels docs), name -> tensor.
    """

    emitted: torch.Tensor
    num_accepted: torch.Tensor
    path: torch.Tensor | None = None
    error: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
