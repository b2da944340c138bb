"""Peers run in the same run on the same prompts: transformers' own `generate`, plain and with prompt
lookup (prompt_lookup_num_tokens). They do not go through our loop, so they have no step records."""

from __future__ import annotations

import torch


class HFGenerate:
    peer = True
    has_q = False
    hidden_layers = ()

    def __init__(self, target, name: str, prompt_lookup: int | None = None):
        self.model = getattr(target, "hf_model", None) or target.model
        self.name = name
        self.prompt_lookup = prompt_lookup
        self.device = target.device

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, eos: set[int]) -> list[int]:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        kw = dict(max_new_tokens=max_new_tokens, eos_token_id=sorted(eos) or None,
                  pad_token_id=sorted(eos)[0] if eos else None, attention_mask=torch.ones_like(ids))
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if self.prompt_lookup:
            kw["prompt_lookup_num_tokens"] = self.prompt_lookup
        out = self.model.generate(ids, **kw)
        return out[0, ids.shape[1]:].tolist()
