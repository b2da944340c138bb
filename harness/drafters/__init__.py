"""Drafters, one protocol (base.py). Names used on the command line:

ar, ngram, suffix, layerskip, selfspec, model, eagle, eagle3, block, and the peers hf-generate, hf-prompt-lookup, and
vllm, vllm-ngram, vllm-draft, vllm-eagle3 (vLLM in its own venv: harness.drafters.vllm_peer)."""

from __future__ import annotations

from harness.drafters.base import Committed, DraftContext, Drafter
from harness.drafters.vllm_peer import VLLM_DRAFTERS, is_vllm
from harness.errors import UserError

DRAFTERS = {
    "ar": "no drafting: the baseline (K = 0) through the same loop",
    "ngram": "prompt lookup: propose what followed the last n tokens earlier in the context",
    "suffix": "suffix decoding: trees from suffix tries of the prompt, this answer and earlier answers (--suffix-*)",
    "layerskip": "self-speculation, early exit: the target's first L layers (--layerskip-layers)",
    "selfspec": "self-speculation, layer skipping: the target without a searched set of layers (--skip-layers)",
    "model": "an independent draft model sharing the target's tokenizer (--draft-model)",
    "eagle": "EAGLE-1/2 head on the target's last hidden state (--head; trees with --total-tokens)",
    "eagle3": "EAGLE-3 head on fused low/middle/high hidden states (--head)",
    "block": "block drafter: K drafts in one head forward on the fused hidden states (--head; chains)",
    "hf-generate": "peer: transformers' own generate",
    "hf-prompt-lookup": "peer: transformers' generate with prompt_lookup_num_tokens = K",
    **VLLM_DRAFTERS,
}


def validate_drafters(names) -> None:
    if not names:
        raise UserError(f"no drafters given: choose from {', '.join(DRAFTERS)}")
    for name in names:
        if name not in DRAFTERS:
            raise UserError(f"unknown drafter '{name}': choose from {', '.join(DRAFTERS)}")
    if any(is_vllm(n) for n in names):
        from harness.drafters.vllm_peer import vllm_python
        vllm_python()  # before any model loads: a missing vLLM venv is a one-line error


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
    if name == "suffix":
        from harness.drafters.suffix import SuffixConfig, SuffixDrafter, parse_verify_cost, read_corpus
        corpus = read_corpus(cfg.suffix_corpus, target.tokenizer) if cfg.suffix_corpus else None
        sc = SuffixConfig(max_nodes=cfg.suffix_max_nodes, alpha=cfg.suffix_alpha)
        if cfg.suffix_verify_cost:
            sc.verify_overhead, sc.verify_per_node = parse_verify_cost(cfg.suffix_verify_cost)
        return SuffixDrafter(sc, corpus)
    if name == "selfspec":
        from harness.drafters.selfspec import build_selfspec
        return build_selfspec(target, cfg)
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
    if is_vllm(name):
        from harness.drafters.vllm_peer import build_vllm_peer
        return build_vllm_peer(name, target, cfg)
    if name == "hf-generate":
        return HFGenerate(target, name)
    return HFGenerate(target, name, prompt_lookup=cfg.k)


__all__ = ["DRAFTERS", "Committed", "DraftContext", "Drafter", "build_drafter", "is_peer", "is_vllm", "validate_drafters"]
