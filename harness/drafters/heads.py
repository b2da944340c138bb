"""EAGLE draft heads: the modules, their folder format and loading.

Variants:
- `eagle` (EAGLE-1/2): the head's input at row t is fc([embed(x_{t+1}) ; norm(f_t)]) (2H -> H), where f_t is the
  target's hidden state at layer -1 (output of the last decoder layer, before the final norm) and norm an
  RMSNorm of the head's own (the features' scale varies a lot across tokens). One decoder
  layer of the Llama family with its own weights follows, then the target's FROZEN final norm and LM head.
  The layer's output (pre-norm) is the head's prediction of f_{t+1}; drafting several tokens feeds it back.
- `eagle3` (EAGLE-3): harness.drafters.eagle3.Eagle3Head, the layout vLLM / SGLang / SpecForge load: a low,
  a middle and a high layer fused by fc (3H -> H), a layer whose q/k/v read [norm(embed) ; norm(feature)],
  its own norm and LM head over a reduced draft vocabulary (d2t offsets / t2d mask). Self-fed steps feed the
  head's output in place of the fused feature.

Row convention (training and drafting alike): head row t pairs the feature of the token at position t with
the embedding of token t+1, sits at RoPE position t, and its output scores token t+2.

Embeddings (and, for eagle, final norm and LM head) are the target's, shared read-only (`Frozen`) and never stored.
A head folder holds config.json (`HeadConfig`) and model.safetensors (the head's own weights). The
config carries a fingerprint of the target's embedding matrix (sha256 of the signs of fixed rows, which
survive any dtype cast), so a head is refused, naming the field, when loaded for another target.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import UserError
from harness.targets.attention import attend, head_attention
from harness.targets.native import SUPPORTED_MODEL_TYPES, LlamaSpec, apply_linear, apply_rope, linear, rms_norm, rope_inv_freq

VARIANTS = ("eagle", "eagle3", "block")  # block: harness.drafters.block (eagle3 layout + a mask embedding)
FORMAT_VERSION = 2  # 2: eagle3 heads in the EAGLE-3 / vLLM layout (format-1 eagle3 heads are refused)
HEADS_DIR = Path(__file__).resolve().parent.parent / "heads"  # heads shipped with the package: <target>-<variant>/


@dataclass
class HeadConfig:
    variant: str  # eagle | eagle3
    target: str  # name of the target it was trained on (informational; the fingerprint decides)
    model_type: str  # the target's family (llama, qwen2, mistral)
    hidden_size: int
    vocab_size: int  # the target's vocabulary
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    attention_bias: bool
    layers: list[int]  # target layers read: [-1] (eagle) or [low, mid, high] (eagle3), non-negative for eagle3
    fingerprint: str  # of the target's embedding matrix (see embedding_fingerprint)
    draft_vocab: int = 0  # eagle3: size of the reduced draft vocabulary (0 = the target's)
    layout: str = "harness"  # eagle: "harness" (feature RMSNorm, input norm) | "safeailab" (EAGLE-1/2's: neither)
    max_positions: int = 8192  # the target's max_position_embeddings (written into exported configs)
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # free-form notes (training command, data size)

    def spec(self) -> LlamaSpec:
        return LlamaSpec(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                         intermediate_size=self.intermediate_size, num_layers=1, num_heads=self.num_heads,
                         num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, rms_eps=self.rms_eps,
                         rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                         attention_bias=self.attention_bias)


def hf_model_of(target):
    """The transformers model behind a target of either backend."""
    return getattr(target, "hf_model", None) or target.model


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """sha256 over the signs of 32 fixed rows of the embedding matrix [V, H] (and its shape)."""
    V = weight.shape[0]
    rows = torch.linspace(0, V - 1, 32).round().long().to(weight.device)
    signs = (weight.detach().index_select(0, rows).float() > 0).cpu().numpy().tobytes()
    return "sha256:" + hashlib.sha256(f"{tuple(weight.shape)}".encode() + signs).hexdigest()[:32]


def default_layers(variant: str, num_layers: int) -> list[int]:
    """eagle reads the last layer; eagle3 a low, a middle and a high one: EAGLE-3's and vLLM's default aux
    layer ids (2, L/2, L-3), which count the input of a layer (id j = the output of layer j - 1 here)."""
    if variant == "eagle":
        return [-1]
    return [min(max(j - 1, 0), num_layers - 1) for j in (2, num_layers // 2, num_layers - 3)]


def config_for_target(target, variant: str, draft_vocab: int = 0) -> HeadConfig:
    if variant not in VARIANTS:
        raise UserError(f"unknown head variant '{variant}': choose {' or '.join(VARIANTS)}")
    model = hf_model_of(target)
    spec = LlamaSpec.from_hf_config(model.config)
    if spec.num_layers < 1:
        raise UserError("the target has no decoder layers: an EAGLE head needs one")
    return HeadConfig(variant=variant, target=target.name, model_type=model.config.model_type,
                      hidden_size=spec.hidden_size, vocab_size=spec.vocab_size,
                      intermediate_size=spec.intermediate_size, num_heads=spec.num_heads,
                      num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, rms_eps=spec.rms_eps,
                      rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling,
                      attention_bias=spec.attention_bias, layers=default_layers(variant, spec.num_layers),
                      fingerprint=embedding_fingerprint(model.get_input_embeddings().weight),
                      draft_vocab=draft_vocab if variant != "eagle" else 0,
                      max_positions=int(getattr(model.config, "max_position_embeddings", 8192) or 8192))


@dataclass
class Frozen:
    """The target's weights a head reads (shared, never trained): embedding [V, H], final norm [H], LM head [V, H]."""

    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float

    def to(self, dtype: torch.dtype) -> "Frozen":
        """The same weights in `dtype` (a tied LM head stays one tensor)."""
        if self.embed.dtype == dtype:
            return self
        embed = self.embed.to(dtype)
        lm_head = embed if self.lm_head is self.embed else self.lm_head.to(dtype)
        return Frozen(embed=embed, norm=self.norm.to(dtype), lm_head=lm_head, eps=self.eps)

    @classmethod
    def of(cls, target) -> "Frozen":
        model = hf_model_of(target)
        if model.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"EAGLE heads support {', '.join(SUPPORTED_MODEL_TYPES)} targets, not "
                            f"'{model.config.model_type}': use another drafter for this target")
        return cls(embed=model.get_input_embeddings().weight.detach(), norm=model.model.norm.weight.detach(),
                   lm_head=model.get_output_embeddings().weight.detach(), eps=model.config.rms_norm_eps)


class HeadLayer(nn.Module):
    """One Llama-family decoder layer with its own weights. Attention is left to the caller (a cache
    when drafting, the unrolled training mask when training): qkv() then finish()."""

    def __init__(self, spec: LlamaSpec, input_norm: bool = True):
        super().__init__()
        H, D = spec.hidden_size, spec.head_dim
        self.spec = spec
        self.ln1 = nn.Parameter(torch.ones(H)) if input_norm else None  # EAGLE-1/2's own layer has none
        self.ln2 = nn.Parameter(torch.ones(H))
        self.wq = nn.Linear(H, spec.num_heads * D, bias=spec.attention_bias)
        self.wk = nn.Linear(H, spec.num_kv_heads * D, bias=spec.attention_bias)
        self.wv = nn.Linear(H, spec.num_kv_heads * D, bias=spec.attention_bias)
        self.wo = nn.Linear(spec.num_heads * D, H, bias=False)
        self.gate = nn.Linear(H, spec.intermediate_size, bias=False)
        self.up = nn.Linear(H, spec.intermediate_size, bias=False)
        self.down = nn.Linear(spec.intermediate_size, H, bias=False)

    def qkv(self, x, cos, sin):
        # x [B, T, H] -> q [B, Hq, T, D], k/v [B, Hkv, T, D]
        s = self.spec
        B, T, _ = x.shape
        h = rms_norm(x, self.ln1, s.rms_eps) if self.ln1 is not None else x
        q = apply_linear(self.wq, h).view(B, T, s.num_heads, s.head_dim).transpose(1, 2)
        k = apply_linear(self.wk, h).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = apply_linear(self.wv, h).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask):
        # q [B, Hq, T, D]; k/v [B, Hkv, S, D]; mask [B or 1, 1, T, S] bool -> [B, Hq, T, D]
        s = self.spec  # the draft heads' backend (harness.targets.attention.head_attention; cached)
        return attend(q, k, v, mask, head_attention(q.device, q.dtype, s.num_heads, s.num_kv_heads, s.head_dim))

    def finish(self, x, att):
        # x [B, T, H]; att [B, Hq, T, D] -> the layer's output [B, T, H]
        B, T, _ = x.shape
        x = x + apply_linear(self.wo, att.transpose(1, 2).reshape(B, T, -1))
        h = rms_norm(x, self.ln2, self.spec.rms_eps)
        return x + apply_linear(self.down, F.silu(apply_linear(self.gate, h)) * apply_linear(self.up, h))


class EagleHead(nn.Module):
    """The trainable part of a head (see module docstring)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        H = cfg.hidden_size
        self.cfg = cfg
        own = cfg.layout == "harness"
        self.fnorm = nn.Parameter(torch.ones(H)) if own else None  # RMSNorm on the feature half of the input
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.layer = HeadLayer(cfg.spec(), input_norm=own)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.spec()).float(), persistent=False)

    def features(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """Target hidden states {layer: [B, T, H]} -> the head's feature [B, T, H]."""
        return hidden[self.cfg.layers[0]].to(self.fc.weight.dtype)  # (a bf16 head reads an fp32 target)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        ang = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        ang = torch.cat((ang, ang), dim=-1)[:, None]  # [B, 1, T, D]
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def inputs(self, embeds: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        if self.fnorm is not None:
            feats = rms_norm(feats, self.fnorm, self.cfg.rms_eps)  # the target's last-layer features run large
        return apply_linear(self.fc, torch.cat([embeds, feats], -1))  # [B, T, 2H] -> [B, T, H]

    def logits(self, out: torch.Tensor, frozen: Frozen) -> torch.Tensor:
        """Head output [.., H] -> logits over the target's vocabulary [.., V]."""
        return linear(rms_norm(out, frozen.norm, frozen.eps), frozen.lm_head)

    def to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits  # eagle drafts over the target's vocabulary

    def target_ids(self) -> torch.Tensor:
        return torch.arange(self.cfg.vocab_size, device=self.fc.weight.device)


def init_head(cfg: HeadConfig, frozen: Frozen, seed: int, token_counts: torch.Tensor | None = None) -> nn.Module:
    """A fresh head of cfg.variant. eagle3: the draft vocabulary is the cfg.draft_vocab most frequent tokens
    of token_counts [V] (harness.drafters.eagle3.init_eagle3)."""
    if cfg.variant == "eagle3":
        from harness.drafters.eagle3 import init_eagle3
        return init_eagle3(cfg, frozen, seed, token_counts)
    if cfg.variant == "block":
        from harness.drafters.block_head import init_block
        return init_block(cfg, frozen, seed, token_counts)
    from harness.drafters.eagle3 import seeded_init
    return seeded_init(EagleHead(cfg), seed)


def new_head(cfg: HeadConfig) -> nn.Module:
    """An uninitialised head module of cfg.variant (for loading weights into)."""
    if cfg.variant == "eagle3":
        from harness.drafters.eagle3 import Eagle3Head
        return Eagle3Head(cfg)
    if cfg.variant == "block":
        from harness.drafters.block_head import BlockHead
        return BlockHead(cfg)
    return EagleHead(cfg)


def save_head(head: nn.Module, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(asdict(head.cfg), indent=2) + "\n")
    return folder


def read_config(folder: str | Path) -> HeadConfig:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder} is not a head folder (needs config.json and model.safetensors): train one "
                        "with `spec-harness train-head`")
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(HeadConfig)}
    missing = sorted(known - set(raw) - {"draft_vocab", "format_version", "extra", "layout", "max_positions"})
    if missing:
        raise UserError(f"head config {path} lacks {', '.join(missing)}: retrain the head with `spec-harness train-head`")
    if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise UserError(f"head {folder} has format {raw['format_version']}, newer than this harness reads "
                        f"({FORMAT_VERSION}): upgrade spec-harness")
    if raw.get("variant") == "eagle3" and raw.get("format_version", 1) < 2:
        raise UserError(f"eagle3 head {folder} has the pre-EAGLE-3 layout (format {raw.get('format_version', 1)}): "
                        "retrain it with `spec-harness train-head --variant eagle3`")
    return HeadConfig(**{k: v for k, v in raw.items() if k in known})


def check_compatible(cfg: HeadConfig, target, variant: str, folder: str | Path) -> None:
    """Raises UserError naming the first field in which the head does not fit the target."""
    want = config_for_target(target, variant)
    retrain = (f"train a head for this target (spec-harness train-head --target <this target> --variant {variant} "
               "--out DIR) and pass --head DIR")
    where = f"head {folder} (trained for target '{cfg.target}')"
    if cfg.variant != variant:
        raise UserError(f"{where} is an '{cfg.variant}' head, not '{variant}': run the '{cfg.variant}' drafter "
                        f"with it, or pass an {variant} head with --head")
    for name in ("model_type", "hidden_size", "vocab_size", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "fingerprint"):
        have, need = getattr(cfg, name), getattr(want, name)
        if have != need:
            what = "embedding fingerprint" if name == "fingerprint" else name
            raise UserError(f"{where} does not fit target '{target.name}': {what} is {have} in the head but "
                            f"{need} in the target; {retrain}")
    for layer in cfg.layers:
        if not -target.num_layers <= layer < target.num_layers:
            raise UserError(f"{where} reads layer {layer} but target '{target.name}' has {target.num_layers} "
                            f"layers; {retrain}")


def load_head(folder: str | Path, target, variant: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Loads a head folder for `target`, checked against it, on the target's device, in `dtype` (default
    the target's)."""
    from safetensors.torch import load_file

    cfg = read_config(folder)
    check_compatible(cfg, target, variant, folder)
    head = new_head(cfg)
    state = load_file(str(Path(folder) / "model.safetensors"))
    own = head.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise UserError(f"head weights in {folder} do not match its config.json: retrain the head")
    head.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    head = head.to(target.device, dtype or target.dtype).eval().requires_grad_(False)
    head.inv_freq = rope_inv_freq(cfg.spec()).float().to(target.device)  # kept in fp32 whatever the dtype
    return head


def head_folder(name: str, target, cfg, train_flags: str = "") -> str:
    """--head, else the head shipped for this target; a one-line error says how to train one."""
    folder = cfg.head or shipped_head(target.name, name)
    if folder is None:
        raise UserError(f"no {name} head for target '{target.name}': train one with `spec-harness train-head "
                        f"--target {cfg.target} --variant {name}{train_flags} --out heads/{target.name}-{name}` "
                        f"and pass --head heads/{target.name}-{name}")
    if not Path(folder).exists():
        raise UserError(f"head folder {folder} not found: check --head")
    return folder


def shipped_head(target_name: str, variant: str) -> Path | None:
    folder = HEADS_DIR / f"{target_name}-{variant}"
    return folder if (folder / "config.json").is_file() else None
