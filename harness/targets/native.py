"""`native` backend: one compact implementation of the Llama family (Llama / SmolLM2, Qwen2, Mistral)
that loads transformers weights (sharing the tensors) and keeps a preallocated KV cache indexed by slot.

Decode, verify and tree-verify are the same forward: T new tokens at per-sequence positions with a
[B, 1, T, S] boolean mask. With `static=True` the attention always spans the whole cache (S = max_len),
so every step of a given T has the same shapes and no host sync: what a CUDA graph needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import UserError
from harness.targets.attention import attend, choose_attention
from harness.targets.base import Target, TargetOutput, causal_or_tree_mask

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class LlamaSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    attention_bias: bool

    @classmethod
    def from_hf_config(cls, cfg) -> "LlamaSpec":
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"the native backend supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not "
                            f"'{cfg.model_type}': use --backend hf")
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise UserError(f"rope type '{rope_type}' is not implemented by the native backend: use --backend hf")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim, rms_eps=cfg.rms_norm_eps, rope_theta=float(theta),
            rope_scaling=rope if rope_type != "default" else None,
            attention_bias=bool(getattr(cfg, "attention_bias", cfg.model_type == "qwen2")),
        )


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = spec.rope_scaling
    if sc is None:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv / sc["factor"]
    # llama3: long wavelengths scaled by factor, short kept, smooth blend between
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


ONEDNN = torch.backends.mkldnn.is_available()  # this torch build has oneDNN (linear() uses it on the CPU)
# dtypes linear() runs through oneDNN on the CPU: fp32, and bf16 where the CPU has bf16 products (one-row
# bf16 products there cost about half the fp32 ones: 390 against 716 us for an 8,192 x 576 weight, one
# thread, Intel Xeon with AMX; F.linear's bf16 path took 825 us)
PACKED_DTYPES = (torch.float32,) + ((torch.bfloat16,) if ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())
PACK_ROWS = 4  # the row count oneDNN's weight layout is chosen for (decode and verify steps: 1 to ~8 rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x [.., H], weight [N, H] -> [.., N].

    On the CPU in float32 (and bfloat16 where the CPU has bf16 products: PACKED_DTYPES), without a gradient to
    carry, it runs oneDNN's linear on a copy of the weight
    packed in oneDNN's blocked layout (made once per weight, kept on the weight, remade when the weight
    changes in place). F.linear goes to MKL, whose fp32 GEMM on these AMD EPYC cores runs a product of
    a few rows as about that many passes over the weight: on SmolLM2's 49,152 x 576 LM head, one core,
    MKL took about 11 / 30 / 29 ms at 1 / 3 / 8 rows and oneDNN 8 / 9 / 11 ms, so verifying 8 tokens
    cost nearly three one-token forwards instead of about one (benchmarks/bench_verify_width.py times
    whole forwards both ways). The products are the same; their summation order differs in the last bits
    (within 1e-4 absolute on those logits). Elsewhere (other devices or dtypes, training, a torch
    without oneDNN, code being traced by torch.compile) it is F.linear."""
    if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype not in PACKED_DTYPES or not ONEDNN
            or weight.dtype != x.dtype or (weight.requires_grad and torch.is_grad_enabled())):
        return F.linear(x, weight, bias)
    version = -1 if weight.is_inference() else weight._version  # (inference tensors keep no version counter)
    hit = getattr(weight, "_harness_packed", None)  # (version, packed copy), kept on the weight itself
    if hit is None or hit[0] != version:
        hit = (version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS))
        weight._harness_packed = hit
    return torch.ops.mkldnn._linear_pointwise(x, hit[1], bias, "none", [], "")  # [.., N]


def apply_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) through linear() (the target's layers, and the draft heads' at inference)."""
    return linear(x, layer.weight, layer.bias)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, D]; cos/sin [B, 1, T, D]
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class Block(nn.Module):
    """One decoder layer; holds references to the transformers layer's weights."""

    def __init__(self, hf_layer, spec: LlamaSpec, attention: str = "sdpa-gqa"):
        super().__init__()
        att, mlp = hf_layer.self_attn, hf_layer.mlp
        self.spec = spec
        self.attention = attention  # harness.targets.attention backend
        self.ln1 = hf_layer.input_layernorm.weight
        self.ln2 = hf_layer.post_attention_layernorm.weight
        self.wq, self.wk, self.wv, self.wo = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x, cos, sin, k_cache, v_cache, slots, mask):
        # x [B, T, H]; k_cache/v_cache [B, Hkv, S, D]; slots [B, T]; mask [B, 1, T, S_att]
        s = self.spec
        B, T, _ = x.shape
        h = rms_norm(x, self.ln1, s.rms_eps)
        q = apply_linear(self.wq, h).view(B, T, s.num_heads, s.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = apply_linear(self.wk, h).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = apply_linear(self.wv, h).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        b_idx = torch.arange(B, device=x.device)[:, None]
        k_cache[b_idx, :, slots] = k.transpose(1, 2)  # [B, T, Hkv, D] into slots
        v_cache[b_idx, :, slots] = v.transpose(1, 2)
        S = mask.shape[-1]
        att = attend(q, k_cache[:, :, :S], v_cache[:, :, :S], mask, self.attention)  # [B, Hq, T, D]
        x = x + apply_linear(self.wo, att.transpose(1, 2).reshape(B, T, s.num_heads * s.head_dim))
        h = rms_norm(x, self.ln2, s.rms_eps)
        return x + apply_linear(self.down, F.silu(apply_linear(self.gate, h)) * apply_linear(self.up, h))


class NativeLM(nn.Module):
    """The Llama-family forward over a slot-indexed cache. Shares its weights with a transformers model."""

    def __init__(self, hf_model, num_layers: int | None = None, layers: tuple[int, ...] | None = None):
        super().__init__()
        spec = LlamaSpec.from_hf_config(hf_model.config)
        inner = hf_model.model
        n = spec.num_layers if num_layers is None else num_layers
        layers = tuple(range(n)) if layers is None else layers  # the decoder layers run, in order (selfspec skips some)
        self.spec = spec
        p = next(hf_model.parameters())
        self.attention = choose_attention(p.device, p.dtype, spec.num_heads, spec.num_kv_heads, spec.head_dim)
        self.embed = inner.embed_tokens
        self.blocks = nn.ModuleList(Block(inner.layers[i], spec, self.attention) for i in layers)
        self.norm = inner.norm.weight
        self.lm_head = hf_model.lm_head
        # on the weights' device: the NativeLM is built around a model already placed, and never moved itself
        self.register_buffer("inv_freq", rope_inv_freq(spec).float().to(p.device), persistent=False)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        ang = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        ang = torch.cat((ang, ang), dim=-1)[:, None]  # [B, 1, T, D]
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def forward(self, ids, positions, k_cache, v_cache, slots, mask, hidden_layers=()):
        x = self.embed(ids)  # [B, T, H]
        cos, sin = self.rope(positions, x.dtype)
        hidden = {}
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, k_cache[i], v_cache[i], slots, mask)
            if i in hidden_layers:
                hidden[i] = x
        logits = linear(rms_norm(x, self.norm, self.spec.rms_eps), self.lm_head.weight, self.lm_head.bias)  # [B, T, V]
        return logits, hidden


class NativeTarget(Target):
    backend = "native"

    def __init__(self, hf_model, tokenizer, name: str, max_len: int = 2048, num_layers: int | None = None,
                 static: bool = False, layers: tuple[int, ...] | None = None):
        self.model = NativeLM(hf_model, num_layers=num_layers, layers=layers).eval()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.name = name
        spec = self.model.spec
        self.vocab_size, self.hidden_size = spec.vocab_size, spec.hidden_size
        self.num_layers = self.model.num_layers
        p = next(hf_model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_len = max_len
        self.static = static
        self.reset(1)

    def reset(self, batch_size: int = 1) -> None:
        s = self.model.spec
        shape = (self.num_layers, batch_size, s.num_kv_heads, self.max_len, s.head_dim)  # [L, B, Hkv, S, D]
        if getattr(self, "k_cache", None) is None or self.k_cache.shape != shape:
            self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.lengths_host = [0] * batch_size

    def _span(self, T: int) -> int:
        if self.static:
            return self.max_len
        need = self.max_length() + T  # the host mirror; a device read only when a caller gave no counts
        if need > self.max_len:
            raise UserError(f"sequence of {need} tokens exceeds the cache ({self.max_len}): raise --max-len")
        return need

    @torch.inference_mode()
    def forward(self, ids, positions=None, tree_mask=None, hidden_layers=()):
        T = ids.shape[1]
        slots = self.default_positions(T)  # [B, T] cache slots of the new tokens
        positions = slots if positions is None else positions
        mask = causal_or_tree_mask(self.lengths, T, self._span(T), tree_mask)
        wanted = tuple(range(self.num_layers)[h] for h in hidden_layers)
        logits, hidden = self.model(ids, positions, self.k_cache, self.v_cache, slots, mask, wanted)
        hidden = {h: hidden[range(self.num_layers)[h]] for h in hidden_layers}
        return TargetOutput(logits=logits, hidden=hidden)

    @torch.inference_mode()
    def prefill_row(self, b: int, ids: torch.Tensor, hidden_layers: tuple[int, ...] = ()) -> TargetOutput:
        """Row b alone, as a view of the batch's cache: its slots 0 .. P-1 are written, lengths[b] = P."""
        P = ids.shape[1]
        if P > self.max_len:
            raise UserError(f"sequence of {P} tokens exceeds the cache ({self.max_len}): raise --max-len")
        if P == 0:  # an empty row (a parked row, or a draft model whose context is one pending token)
            lengths = self.lengths.clone()
            lengths[b] = 0
            self.lengths = lengths
            if self.lengths_host is not None:
                self.lengths_host = self.lengths_host[:b] + [0] + self.lengths_host[b + 1:]
            return None
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        slots = torch.arange(P, device=self.device)[None]  # [1, P]
        mask = causal_or_tree_mask(zero, P, P, None)
        wanted = tuple(range(self.num_layers)[h] for h in hidden_layers)
        logits, hidden = self.model(ids, slots, self.k_cache[:, b:b + 1], self.v_cache[:, b:b + 1], slots, mask,
                                    wanted)  # [L, 1, Hkv, S, D] views: writes land in the batch's cache
        lengths = self.lengths.clone()
        lengths[b] = P
        host = self.lengths_host
        self.lengths = lengths
        if host is not None:
            self.lengths_host = host[:b] + [P] + host[b + 1:]
        return TargetOutput(logits=logits, hidden={h: hidden[range(self.num_layers)[h]] for h in hidden_layers})

    @torch.inference_mode()
    def keep_rows(self, rows: list[int]) -> None:
        """Row i takes what row rows[i] held; the cache shrinks to len(rows) rows (a view). Only rows that
        move are copied."""
        moved = [(i, r) for i, r in enumerate(rows) if r != i]
        if moved:
            dst = torch.tensor([i for i, _ in moved], device=self.device)
            src = torch.tensor([r for _, r in moved], device=self.device)
            for cache in (self.k_cache, self.v_cache):  # [L, B, Hkv, S, D]
                cache[:, dst] = cache[:, src]
        n = len(rows)
        self.lengths = self.lengths[torch.tensor(rows, dtype=torch.long, device=self.device)]
        if self.lengths_host is not None:
            self.lengths_host = [self.lengths_host[r] for r in rows]
        self.k_cache, self.v_cache = self.k_cache[:, :n], self.v_cache[:, :n]

    @torch.inference_mode()
    def commit_path(self, slots, n, n_host: list[int] | None = None):
        # slots [B, D] offsets from lengths of the kept nodes (in path order), n [B]
        B, D = slots.shape
        src = self.lengths[:, None] + slots.clamp(min=0)  # [B, D]
        dst = self.lengths[:, None] + torch.arange(D, device=self.device)[None, :]
        src = torch.where(slots >= 0, src, dst)  # padding copies onto itself
        b_idx = torch.arange(B, device=self.device)[:, None]
        for cache in (self.k_cache, self.v_cache):
            moved = cache[:, b_idx, :, src]  # [L, B, D, Hkv, Dh]
            cache[:, b_idx, :, dst] = moved
        self.commit(n, n_host)
