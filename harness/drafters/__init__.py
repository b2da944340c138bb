"""Drafters, one protocol (base.py). Names used on the command line:

ar, ngram, layerskip, model, eagle, eagle3, block, and the peers hf-generate, hf-prompt-lookup."""

from __future__ import annotations

from harness.drafters.base import Committed, DraftContext, Drafter
from harness.errors import UserError

DRAFTERS = {
    "ar": "no drafting: the baseline (K = 0) through the same loop",
    "ngram": "prompt lookup: propose what followed the last n tokens earlier in the context",
    "layerskip": "self-speculation with the target's first L layers (--layerskip-layers)",
    "model": "an independent draft model sharing the target's tokenizer (--draft-model)",
    "eagle": "EAGLE-1/2 head on the target's last hidden state (--head; trees with --total-tokens)",
    "eagle3": "EAGLE-3 head on fused low/middle/high hidden states (--head)",
    "block": "block drafter: K drafts in one head forward on the fused hidden states (--head; chains)",
    "hf-generate": "peer: transformers' own generate",
    "hf-prompt-lookup": "peer: transformers' generate with prompt_lookup_num_tokens = K",
}


def validate_drafters(names) -> None:
    if not names:
        raise UserError(f"no drafters given: choose from {', '.join(DRAFTERS)}")
    for name in names:
        if name not in DRAFTERS:
            raise UserError(f"unknown drafter '{name}': choose from {', '.join(DRAFTERS)}")


def is_peer(drafter) -> bool:
    return getattr(drafter, "peer", False)


def build_drafter(name: str, target, cfg):
    from harness.drafters.ar import AR
    from harness.drafters.model import ARDraftModel, check_same_vocab, layerskip
    from harness.drafters.ngram import NGram
    from harness.drafters.peer import HFGenerate

    validate_drafters([name])
    if name == "ar":
        return AR()
    if name == "ngram":
        return NGram()
    if name == "layerskip":
        return layerskip(target, cfg.layerskip_layers or max(1, target.num_layers // 3))
    if name == "model":
        if not cfg.draft_model:
            raise UserError("the model drafter needs --draft-model (a preset, model folder, .gguf or hub id)")
        from harness.targets import load_target
        draft = load_target(cfg.draft_model, backend="auto", device=target.device, dtype=target.dtype,
                            max_len=target.max_len)
        check_same_vocab(target, draft)
        return ARDraftModel(draft, "model")
    if name == "block":
        from harness.drafters.block import build_block
        return build_block(target, cfg)
    if name in ("eagle", "eagle3"):
        from harness.drafters.eagle import build_eagle
        return build_eagle(name, target, cfg)
    if name == "hf-generate":
        return HFGenerate(target, name)
    return HFGenerate(target, name, prompt_lookup=cfg.k)


__all__ = ["DRAFTERS", "Committed", "DraftContext", "Drafter", "build_drafter", "is_peer", "validate_drafters"]
