"""`selfspec`: self-speculation that skips a chosen set of middle layers (Draft & Verify, Zhang et al. 2023;
SWIFT, Xia et al. 2024). The draft model is the target without those layers: the same weights, its own KV
cache (harness.drafters.model.ARDraftModel over a NativeTarget view). `layerskip` (early exit: the first L
layers and the LM head) stays as the other self-speculation option.

The skip set (--skip-layers): a comma-separated list, a search.json written by `spec-harness selfspec-search`,
or `auto` (the default: search now; the chosen set and the search table go into the run's config.json under
extra.selfspec).

The search, on the `calibration` prompts (disjoint from the suites), at temperature 0:
 1. trajectories: the target decodes each prompt greedily (batch 1; these decodes also time `ar`);
 2. acceptance without decoding: one teacher-forced forward of a candidate draft model over prompt +
    trajectory gives its greedy prediction at every position. Given that drafts 1..j-1 were accepted, draft
    j's context is exactly the trajectory, so a chain step at position i accepts the run of consecutive
    agreements starting at i (at most K). Simulating the steps gives the conditional acceptance a_j that
    decoding would measure (harness.calibrate's definition);
 3. candidates: each layer's cost is scored by the agreement left when it alone is skipped; candidate sets
    are the m least costly layers and the m middle layers (a contiguous block), for a few sizes m;
 4. the cost model (harness.calibrate.Calibration): measured t_forward(T) and t_accept(K) of the target,
    measured t_draft(K) for each number of kept layers (it depends on the count only; `measure_times`:
    interleaved rounds, fastest call kept), the simulated a_j;
    each candidate's predicted tok/s is that of its best K;
 5. ar and every candidate are then decoded (each at its best K) and timed, in interleaved rounds (the
    fastest kept); the chosen set is the one of best measured tok/s among them (the cost model chose each
    K and ranks the table; its favourite is marked `predicted_best`). The table shows predicted against
    measured tok/s, tau and speedup per candidate, and the simulated accepted drafts against the decoded
    ones (equal at temperature 0 in fp32). The run's summary.md names the chosen set.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


from harness.drafters.model import ARDraftModel
from harness.errors import UserError
from harness.targets.base import Target


class SelfSpec(ARDraftModel):
    """The skip-layer draft model; drafts chains of `k` tokens when given (the search's best K), else --k."""

    def __init__(self, model, name: str, skip: tuple[int, ...], k: int | None = None):
        super().__init__(model, name)
        self.skip, self.k = skip, k

    def _own_k(self, ctx):
        return ctx if self.k is None else dataclasses.replace(ctx, k=self.k)

    def propose(self, ctx):
        return super().propose(self._own_k(ctx))

    def observe(self, ctx, committed) -> None:
        super().observe(self._own_k(ctx), committed)


def skip_view(target: Target, skip, name: str = "selfspec", k: int | None = None) -> SelfSpec:
    """The target with the layers in `skip` left out, as a draft model (shared weights, own cache)."""
    from harness.targets.native import NativeTarget

    L = target.num_layers
    skip = tuple(sorted(set(int(s) for s in skip)))
    if not skip or skip[0] < 0 or skip[-1] >= L or len(skip) >= L:
        raise UserError(f"--skip-layers must name between 1 and {L - 1} distinct layers in 0..{L - 1}, got "
                        f"{','.join(map(str, skip)) or 'none'}")
    keep = tuple(i for i in range(L) if i not in skip)
    hf_model = getattr(target, "hf_model", None) or getattr(target, "model", None)
    view = NativeTarget(hf_model, target.tokenizer, f"{target.name}[skip {','.join(map(str, skip))}]",
                        max_len=target.max_len, static=getattr(target, "static", False), layers=keep)
    return SelfSpec(view, name, skip, k)


# ----------------------------------------------------------------------------- runs

def resolve_skip(target: Target, spec: str | None, cfg) -> tuple[tuple[int, ...], int | None, dict | None]:
    """--skip-layers: (skip set, K the search chose or None, search result or None)."""
    spec = (spec or "auto").strip()
    if spec == "auto":  # searched by the runner before the drafters are built (harness.selfspec_search)
        result = cfg.extra.get("selfspec_search") if cfg is not None else None
        if result is None:
            raise UserError("--skip-layers auto is searched by `spec-harness run`; elsewhere pass a search file "
                            "from `spec-harness selfspec-search` or a list of layers")
        return tuple(result["skip"]), result["k"], result
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--skip-layers {spec}: file not found (write one with `spec-harness selfspec-search`)")
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            skip = tuple(int(x) for x in result["skip"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"--skip-layers {spec} is not a search file from `spec-harness selfspec-search`") from None
        if result.get("target") not in (None, target.name):
            raise UserError(f"--skip-layers {spec} was searched on target {result['target']}, not {target.name}")
        return skip, result.get("k"), result
    try:
        skip = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--skip-layers takes auto, a search .json or comma-separated layer indices, got {spec!r}") from None
    return skip, None, None


def build_selfspec(target: Target, cfg) -> SelfSpec:
    skip, k, result = resolve_skip(target, cfg.skip_layers, cfg)
    drafter = skip_view(target, skip, k=k)
    cfg.extra["selfspec"] = dict(skip=list(skip), searched_k=k, search=result)  # recorded in config.json
    return drafter
