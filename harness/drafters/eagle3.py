"""The EAGLE-3 head, in the module layout that SafeAILab's EAGLE-3, SpecForge, vLLM and SGLang load.

    g_t   = fc([h_low ; h_mid ; h_high])                  [.., 3H] -> [.., H], no bias (the fused feature)
    e     = input_layernorm(embed(x_{t+1}))               the target's embedding, frozen and not stored
    a     = attn(q/k/v from [e ; hidden_norm(g_t)])       q/k/v read the 2H concatenation
    r     = g_t + o_proj(a)
    out   = r + mlp(post_attention_layernorm(r))          the head's output (pre-norm): fed back as the next g
    logit = lm_head(norm(out))                            [.., N] over the draft vocabulary
    target id = draft id + d2t[draft id];  t2d[target id] = the target token is in the draft vocabulary

h_low, h_mid, h_high are the target's hidden states of the layers in HeadConfig.layers (this harness's
convention: layer l = the output of decoder layer l; the exported `eagle_aux_hidden_state_layer_ids` are
vLLM's, id j = the input of layer j = l + 1). Self-fed steps feed `out` in place of g (no fc), as vLLM does.

State-dict names are the checkpoint's: fc.weight, midlayer.{input_layernorm, hidden_norm,
post_attention_layernorm}.weight, midlayer.self_attn.{q,k,v,o}_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight,
norm.weight, lm_head.weight, d2t (int64 offsets), t2d (bool). harness.drafters.interop converts folders.

Interface shared with harness.drafters.heads.EagleHead (what the drafter and the trainer call): features(),
inputs() (here the packed [embed ; feature] pair [.., 2H]), rope(), layer.qkv / attend / finish, logits(),
to_target_vocab(), target_ids().
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.targets.attention import attend, head_attention
from harness.targets.native import LlamaSpec, apply_linear, apply_rope, linear, rms_norm, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: LlamaSpec, in_size: int):
        super().__init__()
        D, b = spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(in_size, spec.num_heads * D, bias=b)
        self.k_proj = nn.Linear(in_size, spec.num_kv_heads * D, bias=b)
        self.v_proj = nn.Linear(in_size, spec.num_kv_heads * D, bias=b)
        self.o_proj = nn.Linear(spec.num_heads * D, spec.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, spec: LlamaSpec):
        super().__init__()
        H, I = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return apply_linear(self.down_proj, F.silu(apply_linear(self.gate_proj, x)) * apply_linear(self.up_proj, x))


class MidLayer(nn.Module):
    """EAGLE-3's decoder layer. x is the packed pair [e_raw ; g] [B, T, 2H]: qkv() normalises both halves
    and reads their concatenation; finish() adds attention and MLP to the residual g."""

    def __init__(self, spec: LlamaSpec):
        super().__init__()
        H = spec.hidden_size
        self.spec = spec
        self.input_layernorm = RMSNorm(H, spec.rms_eps)
        self.hidden_norm = RMSNorm(H, spec.rms_eps)
        self.post_attention_layernorm = RMSNorm(H, spec.rms_eps)
        self.self_attn = Attention(spec, 2 * H)
        self.mlp = MLP(spec)

    def qkv(self, x, cos, sin):
        # x [B, T, 2H] -> q [B, Hq, T, D], k/v [B, Hkv, T, D]
        s, a = self.spec, self.self_attn
        B, T, _ = x.shape
        e, g = x.split(s.hidden_size, -1)
        h = torch.cat([self.input_layernorm(e), self.hidden_norm(g)], -1)
        q = apply_linear(a.q_proj, h).view(B, T, s.num_heads, s.head_dim).transpose(1, 2)
        k = apply_linear(a.k_proj, h).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = apply_linear(a.v_proj, h).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask):
        # q [B, Hq, T, D]; k/v [B, Hkv, S, D]; mask [B or 1, 1, T, S] bool -> [B, Hq, T, D]
        s = self.spec  # the draft heads' backend (harness.targets.attention.head_attention; cached)
        return attend(q, k, v, mask, head_attention(q.device, q.dtype, s.num_heads, s.num_kv_heads, s.head_dim))

    def finish(self, x, att):
        # x [B, T, 2H]; att [B, Hq, T, D] -> the layer's output [B, T, H]
        B, T, _ = x.shape
        r = x[..., self.spec.hidden_size:] + apply_linear(self.self_attn.o_proj, att.transpose(1, 2).reshape(B, T, -1))
        return r + self.mlp(self.post_attention_layernorm(r))


class Eagle3Head(nn.Module):
    """The trainable EAGLE-3 head (see module docstring); cfg is a harness.drafters.heads.HeadConfig."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        N = cfg.draft_vocab or cfg.vocab_size
        self.cfg = cfg
        self.fc = nn.Linear(len(cfg.layers) * H, H, bias=False)
        self.midlayer = MidLayer(cfg.spec())
        self.norm = RMSNorm(H, cfg.rms_eps)
        self.lm_head = nn.Linear(H, N, bias=False)
        self.register_buffer("d2t", torch.zeros(N, dtype=torch.long))  # target id = draft id + d2t[draft id]
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))  # target id in the draft vocab
        self.register_buffer("inv_freq", rope_inv_freq(cfg.spec()).float(), persistent=False)
        self.set_vocab(torch.arange(N))

    @property
    def layer(self) -> MidLayer:
        return self.midlayer

    @torch.no_grad()
    def set_vocab(self, ids: torch.Tensor) -> None:
        """Draft id i <-> target id ids[i] (ids sorted, distinct)."""
        ids = ids.to(self.d2t.device)
        self.d2t.copy_(ids - torch.arange(len(ids), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def target_ids(self) -> torch.Tensor:
        """[N] the target id of each draft id."""
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def features(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """Target hidden states {layer: [B, T, H]} -> the fused feature g [B, T, H]."""
        cat = torch.cat([hidden[layer] for layer in self.cfg.layers], -1)
        return apply_linear(self.fc, cat.to(self.fc.weight.dtype))  # (a bf16 head reads an fp32 target)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        ang = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        ang = torch.cat((ang, ang), dim=-1)[:, None]  # [B, 1, T, D]
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def inputs(self, embeds: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return torch.cat([embeds, feats], -1)  # [B, T, 2H]: the layer normalises each half

    def logits(self, out: torch.Tensor, frozen=None) -> torch.Tensor:
        """Head output [.., H] -> logits over the draft vocabulary [.., N]."""
        return linear(self.norm(out), self.lm_head.weight)

    def to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [.., N] -> [.., V] (-inf outside the draft vocabulary)."""
        if logits.shape[-1] == self.cfg.vocab_size:  # the full vocabulary: d2t is all zeros
            return logits
        full = logits.new_full((*logits.shape[:-1], self.cfg.vocab_size), float("-inf"))
        return full.index_copy(-1, self.target_ids(), logits)


def seeded_init(head: nn.Module, seed: int) -> nn.Module:
    """Linear weights ~ N(0, 0.02), biases 0, drawn from `seed` without disturbing the global RNG."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for mod in head.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    torch.random.set_rng_state(gen_state)
    return head


def init_eagle3(cfg, frozen, seed: int, token_counts: torch.Tensor | None = None, cls=None) -> Eagle3Head:
    """A fresh EAGLE-3 head. The draft vocabulary is the N most frequent target tokens of token_counts [V]
    (the first N ids without counts); lm_head starts from the target's LM-head rows of those tokens, norm
    from the target's final norm."""
    head = seeded_init((cls or Eagle3Head)(cfg), seed)
    N = cfg.draft_vocab or cfg.vocab_size
    ids = (torch.arange(N) if token_counts is None or N == cfg.vocab_size
           else token_counts.topk(N).indices.sort().values)
    with torch.no_grad():
        head.set_vocab(ids)
        head.lm_head.weight.copy_(frozen.lm_head.detach().cpu().float()[ids])
        head.norm.weight.copy_(frozen.norm.detach().cpu().float())
    return head
