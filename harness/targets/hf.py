"""`hf` backend: any transformers causal LM through its public API (DynamicCache, 4D masks, hooks).

Batch size 1 only (ragged batches need the native backend). Rolling back crops the cache; a tree step
gathers the accepted path's keys and values into consecutive positions.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from harness.errors import UserError
from harness.targets.base import Target, TargetOutput, causal_or_tree_mask


class HFTarget(Target):
    backend = "hf"

    def __init__(self, hf_model, tokenizer, name: str, max_len: int = 2048):
        self.model = hf_model.eval()
        self.tokenizer = tokenizer
        self.name = name
        cfg = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
        self.vocab_size = hf_model.get_output_embeddings().weight.shape[0]
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        p = next(hf_model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_len = max_len
        self._layers = self._find_layers()
        self.reset(1)

    def _find_layers(self):
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise UserError("this transformers model has no .model.layers: hidden states cannot be tapped; "
                            "use a decoder-only causal LM")
        return layers

    def reset(self, batch_size: int = 1) -> None:
        if batch_size != 1:
            raise UserError("the hf backend decodes one sequence at a time: use --backend native for --batch-size > 1")
        self.cache = DynamicCache(config=self.model.config)
        self.lengths = torch.zeros(1, dtype=torch.long, device=self.device)
        self.lengths_host = [0]
        self._cached = 0  # tokens held by the DynamicCache (committed or not)

    @torch.inference_mode()
    def forward(self, ids, positions=None, tree_mask=None, hidden_layers=()):
        T = ids.shape[1]
        L = int(self.lengths[0])
        if L + T > self.max_len:
            raise UserError(f"sequence of {L + T} tokens exceeds the cache ({self.max_len}): raise --max-len")
        if self._cached > L:
            self._keep(torch.arange(L, device=self.device))  # drop rejected drafts left from the last step
        positions = self.default_positions(T) if positions is None else positions
        mask = causal_or_tree_mask(self.lengths, T, L + T, tree_mask)  # [1, 1, T, L+T] bool
        wanted = {range(self.num_layers)[h]: h for h in hidden_layers}
        taps, hooks = {}, []
        for idx, key in wanted.items():
            def hook(_mod, _inp, out, key=key):
                taps[key] = out[0] if isinstance(out, tuple) else out
            hooks.append(self._layers[idx].register_forward_hook(hook))
        try:
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                             past_key_values=self.cache, use_cache=True)
        finally:
            for h in hooks:
                h.remove()
        self._cached = L + T
        return TargetOutput(logits=out.logits, hidden=taps)

    @torch.inference_mode()
    def commit_path(self, slots, n, n_host=None):
        L = int(self.lengths[0])
        k = int(n[0])
        keep = torch.arange(L, device=self.device)
        path = L + slots[0, :k].to(self.device)
        self._keep(torch.cat([keep, path]))
        self.commit(n, n_host)

    def _keep(self, idx: torch.Tensor) -> None:
        """Keeps the cache entries at positions idx [n] (in order) in every layer."""
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                at = idx.to(layer.keys.device)  # layers may sit on different devices (--device-map auto)
                layer.keys = layer.keys.index_select(-2, at)
                layer.values = layer.values.index_select(-2, at)
        self._cached = idx.numel()
