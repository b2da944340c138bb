"""Drafters, one protocol (base.py). Names used on the command line:

ar, ngram, suffix, layerskip, selfspec, model, eagle, eagle3, block, and the peers hf-generate, hf-prompt-lookup, and
vllm, vllm-ngram, vllm-draft, vllm-eagle3 (vLLM in its own venv: harness.drafters.vllm_peer).

A name may carry settings of its own, NAME:KEY=VALUE[:KEY=VALUE...] with the keys of VARIANT_OPTIONS
(the run's flags of the same name, dashes or underscores): `--drafters ar,eagle3:k=3,eagle3:depth=5:top_k=8:total_tokens=32`
runs a chain of 3 and a tree in one run, on the same prompts against the same `ar`. The whole spec is the
drafter's label in every record, table and random-stream key; the run's flags apply to what it leaves out."""

from __future__ import annotations

import dataclasses

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


VARIANT_OPTIONS = {"k": int, "depth": int, "top_k": int, "total_tokens": int, "stop_below": float, "head": str, "head_dtype": str,
                   "suffix_max_nodes": int, "suffix_alpha": float, "layerskip_layers": int}


def base_name(spec: str) -> str:
    """'eagle3:k=3' -> 'eagle3'."""
    return spec.split(":", 1)[0]


def parse_variant(spec: str) -> tuple[str, dict]:
    """'eagle3:k=3:total_tokens=0' -> ('eagle3', {'k': 3, 'total_tokens': 0}); a bad setting is a UserError."""
    base, *settings = spec.split(":")
    values: dict = {}
    for setting in settings:
        key, sep, raw = setting.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in VARIANT_OPTIONS:
            raise UserError(f"drafter '{spec}': '{setting}' is not KEY=VALUE with KEY one of "
                            f"{', '.join(VARIANT_OPTIONS)} (e.g. eagle3:k=3)")
        if key in values:
            raise UserError(f"drafter '{spec}' sets {key} twice")
        kind = VARIANT_OPTIONS[key]
        try:
            values[key] = kind(raw.strip())
        except ValueError:
            raise UserError(f"drafter '{spec}': {key} must be {'an integer' if kind is int else 'a number'}, "
                            f"got '{raw}'") from None
    if "stop_below" in values and base not in ("eagle", "eagle3"):
        raise UserError(f"drafter '{spec}': stop_below is for eagle and eagle3 chains, not {base}")
    if "head_dtype" in values and base not in ("eagle", "eagle3"):
        raise UserError(f"drafter '{spec}': head_dtype is for eagle and eagle3, not {base}")
    if values and base == "ar":
        raise UserError(f"drafter '{spec}': ar takes no settings (it is the baseline)")
    if "k" in values and not 1 <= values["k"] <= 64:
        raise UserError(f"drafter '{spec}': k must be between 1 and 64, got {values['k']}")
    return base, values


def drafter_config(cfg, spec: str):
    """The run's config with the drafter's own settings applied (harness.config.RunConfig)."""
    values = parse_variant(spec)[1]
    return dataclasses.replace(cfg, **values) if values else cfg


def validate_drafters(names) -> None:
    if not names:
        raise UserError(f"no drafters given: choose from {', '.join(DRAFTERS)}")
    for name in names:
        if base_name(name) not in DRAFTERS:
            raise UserError(f"unknown drafter '{base_name(name)}': choose from {', '.join(DRAFTERS)}")
        parse_variant(name)
    if len(set(names)) < len(names):
        raise UserError(f"a drafter is named twice in --drafters {','.join(names)}: give each a setting of its own")
    if any(is_vllm(base_name(n)) for n in names):
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
    cfg = drafter_config(cfg, name)
    name = base_name(name)
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
