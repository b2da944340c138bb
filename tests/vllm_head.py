"""A random-weight EAGLE-3 head in vLLM's layout (LlamaForCausalLMEagle3, the SpecForge checkpoint
layout), for testing that vllm-eagle3 loads a head and drafts with it before a trained one is exported.

Layout: fc.weight [H, 3H] (no bias) fuses three target layers' hidden states; midlayer.* is one Llama
decoder layer whose q/k/v read [embedding; fused feature] (2H), with hidden_norm on the feature and
input_layernorm on the embedding; norm.weight; lm_head.weight [draft_vocab, H]; d2t [draft_vocab]
int64 offsets (target id = draft id + d2t[draft id]). The embedding is the target's (not stored)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_random_eagle3_head(out: Path, target_config: dict, draft_vocab: int = 2048, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    H, inter = target_config["hidden_size"], target_config["intermediate_size"]
    heads, kv = target_config["num_attention_heads"], target_config["num_key_value_heads"]
    hd = target_config.get("head_dim") or H // heads
    layers = target_config["num_hidden_layers"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).contiguous()

    tensors = {
        "fc.weight": w(H, 3 * H),
        "midlayer.self_attn.q_proj.weight": w(heads * hd, 2 * H),
        "midlayer.self_attn.k_proj.weight": w(kv * hd, 2 * H),
        "midlayer.self_attn.v_proj.weight": w(kv * hd, 2 * H),
        "midlayer.self_attn.o_proj.weight": w(H, heads * hd),
        "midlayer.mlp.gate_proj.weight": w(inter, H),
        "midlayer.mlp.up_proj.weight": w(inter, H),
        "midlayer.mlp.down_proj.weight": w(H, inter),
        "midlayer.input_layernorm.weight": torch.ones(H),
        "midlayer.hidden_norm.weight": torch.ones(H),
        "midlayer.post_attention_layernorm.weight": torch.ones(H),
        "norm.weight": torch.ones(H),
        "lm_head.weight": w(draft_vocab, H),
        "d2t": torch.zeros(draft_vocab, dtype=torch.long),  # draft ids = the first draft_vocab target ids
    }
    save_file(tensors, str(out / "model.safetensors"))
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": H, "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": hd, "num_hidden_layers": 1, "hidden_act": "silu",
        "rms_norm_eps": target_config.get("rms_norm_eps", 1e-5), "rope_theta": _rope_theta(target_config),
        "max_position_embeddings": target_config.get("max_position_embeddings", 2048),
        "vocab_size": target_config["vocab_size"], "draft_vocab_size": draft_vocab, "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eagle_aux_hidden_state_layer_ids": [1, layers // 2 - 1, layers - 4],
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _rope_theta(cfg: dict) -> float:
    return float((cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta") or 10000.0)
