"""Heads from and for other tools: `spec-harness import-head` and `spec-harness export-head`.

Layouts read and written (checked against the published loaders; see README "Head interop"):

EAGLE-1/2, SafeAILab (`eagle` here, layout "safeailab"): config.json of a one-layer Llama; weights
    fc.weight [H, 2H], fc.bias [H] (when the config's `bias` is true, the default), reading [embed ; feature];
    layers.0.self_attn.{q,k,v,o}_proj.weight, layers.0.mlp.{gate,up,down}_proj.weight,
    layers.0.post_attention_layernorm.weight (the first layer has no input norm); optional embed_tokens.weight.
    The feature is the target's last hidden state before the final norm; logits are the target's LM head.
EAGLE-3, SafeAILab / SpecForge / vLLM / SGLang (`eagle3`): config.json with architectures
    ["LlamaForCausalLMEagle3"], draft_vocab_size, eagle_aux_hidden_state_layer_ids (optional: vLLM's default
    2, L/2, L-3); weights fc.weight [H, 3H] (no bias), midlayer.{input_layernorm, hidden_norm,
    post_attention_layernorm}.weight, midlayer.self_attn.{q,k,v}_proj.weight [*, 2H], o_proj.weight,
    midlayer.mlp.*, norm.weight, lm_head.weight [N, H], d2t [N] int64 (target id = draft id + d2t),
    t2d [V] bool; optional embed_tokens.weight. harness.drafters.eagle3.Eagle3Head uses these names itself.

Layer ids: the checkpoints count aux layers as vLLM does (id j = the input of decoder layer j, i.e. the output
of layer j - 1); this harness stores the output-of-layer index (HeadConfig.layers = ids - 1).

The embedding is always the target's. A checkpoint that carries embed_tokens.weight is accepted only when it
equals the target's embedding (to 1e-3), since drafting reads the target's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harness.drafters.heads import (HeadConfig, config_for_target, hf_model_of, new_head, read_config, save_head)
from harness.errors import UserError

EAGLE3_ARCH = "LlamaForCausalLMEagle3"
EAGLE1_NAMES = {  # SafeAILab EAGLE-1/2 name -> harness EagleHead name
    "fc.weight": "fc.weight", "fc.bias": "fc.bias",
    "layers.0.self_attn.q_proj.weight": "layer.wq.weight", "layers.0.self_attn.k_proj.weight": "layer.wk.weight",
    "layers.0.self_attn.v_proj.weight": "layer.wv.weight", "layers.0.self_attn.o_proj.weight": "layer.wo.weight",
    "layers.0.self_attn.q_proj.bias": "layer.wq.bias", "layers.0.self_attn.k_proj.bias": "layer.wk.bias",
    "layers.0.self_attn.v_proj.bias": "layer.wv.bias",
    "layers.0.mlp.gate_proj.weight": "layer.gate.weight", "layers.0.mlp.up_proj.weight": "layer.up.weight",
    "layers.0.mlp.down_proj.weight": "layer.down.weight",
    "layers.0.post_attention_layernorm.weight": "layer.ln2",
}
IGNORED = ("embed_tokens.weight", "layers.0.input_layernorm.weight")  # see module docstring


def register(sub) -> None:
    p = sub.add_parser("import-head", help="import an EAGLE-1/2 or EAGLE-3 checkpoint (SafeAILab / SpecForge)",
                       description="Convert an EAGLE-1/2 (SafeAILab) or EAGLE-3 (SafeAILab / SpecForge / vLLM) "
                                   "checkpoint folder into a head folder for a Llama-family target.")
    p.add_argument("src", help="checkpoint folder: config.json + model.safetensors or pytorch_model.bin")
    p.add_argument("--target", default="smollm2-135m", help="the target it drafts for (preset, folder or .gguf)")
    p.add_argument("--out", required=True, help="head folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import)
    e = sub.add_parser("export-head", help="write an eagle3 head in the EAGLE-3 layout vLLM and SGLang load",
                       description="Write an eagle3 head folder as an EAGLE-3 checkpoint (LlamaForCausalLMEagle3): "
                                   "vLLM speculative_config={'method': 'eagle3', 'model': OUT}.")
    e.add_argument("head", help="head folder (from train-head or import-head)")
    e.add_argument("--out", required=True, help="checkpoint folder to write")
    e.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)


def _fresh(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} exists: pass --overwrite to replace it")


def read_checkpoint(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of a checkpoint folder (model.safetensors or pytorch_model.bin)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder} has no config.json: pass an EAGLE checkpoint folder")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{cfg_path} is not valid JSON ({err.msg}): check the file") from None
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        tensors = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        tensors = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{folder} has neither model.safetensors nor pytorch_model.bin: pass a checkpoint folder")
    return config, dict(tensors)


def is_eagle3(config: dict, tensors: dict) -> bool:
    return EAGLE3_ARCH in (config.get("architectures") or []) or any(k.startswith("midlayer.") for k in tensors)


def _check_embedding(tensors: dict, target, src) -> None:
    emb = tensors.get("embed_tokens.weight")
    if emb is None:
        return
    mine = hf_model_of(target).get_input_embeddings().weight.detach().float().cpu()
    if emb.shape != mine.shape or not torch.allclose(emb.float(), mine, atol=1e-3, rtol=1e-3):
        raise UserError(f"{src} carries its own embed_tokens, which differs from target '{target.name}''s: this "
                        "harness drafts with the target's embedding; import it for the target it was trained with")


def _need(tensors: dict, name: str, shape: tuple, src) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"{src} lacks tensor '{name}': not an EAGLE checkpoint of the expected layout")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{src}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)} for target "
                        "sizes; import it for the target it was trained with")
    return t


def import_head(src: str | Path, target, out: str | Path) -> Path:
    """Converts checkpoint folder `src` into a head folder for `target` (checked against it)."""
    config, tensors = read_checkpoint(src)
    _check_embedding(tensors, target, src)
    if is_eagle3(config, tensors):
        return _import_eagle3(src, config, tensors, target, out)
    return _import_eagle1(src, config, tensors, target, out)


def _check_sizes(cfg: HeadConfig, config: dict, src) -> None:
    for key, have in (("hidden_size", cfg.hidden_size), ("num_attention_heads", cfg.num_heads),
                      ("num_key_value_heads", cfg.num_kv_heads), ("intermediate_size", cfg.intermediate_size)):
        if key in config and int(config[key]) != have:
            raise UserError(f"{src}: {key} is {config[key]} in the checkpoint but {have} in the target: "
                            "import it for the target it was trained with")
    if int(config.get("target_hidden_size", cfg.hidden_size)) != cfg.hidden_size:
        raise UserError(f"{src}: target_hidden_size differs from hidden_size, which this harness does not support")


def _import_eagle1(src, config, tensors, target, out) -> Path:
    cfg = config_for_target(target, "eagle")
    cfg.layout = "safeailab"
    cfg.extra = dict(imported_from=str(src), source_layout="SafeAILab EAGLE-1/2")
    _check_sizes(cfg, config, src)
    head = new_head(cfg)
    own = head.state_dict()
    state = {}
    for theirs, mine in EAGLE1_NAMES.items():
        if mine not in own:
            continue
        if theirs.endswith(".bias") and theirs not in tensors:  # trained without that bias (config bias = false)
            state[mine] = torch.zeros_like(own[mine])
            continue
        state[mine] = _need(tensors, theirs, own[mine].shape, src).float()
    unknown = sorted(set(tensors) - set(EAGLE1_NAMES) - set(IGNORED))
    if unknown:
        raise UserError(f"{src} has tensors this harness does not map ({', '.join(unknown[:4])}): not a SafeAILab "
                        "EAGLE-1/2 checkpoint")
    head.load_state_dict(state)
    return save_head(head, out, dtype=torch.float32)


def _import_eagle3(src, config, tensors, target, out) -> Path:
    N = int(config.get("draft_vocab_size") or config.get("vocab_size") or 0)
    cfg = config_for_target(target, "eagle3", draft_vocab=N)
    ids = config.get("eagle_aux_hidden_state_layer_ids") or (config.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids")
    if ids:
        if len(ids) != 3 or not all(1 <= int(j) <= target.num_layers for j in ids):
            raise UserError(f"{src}: eagle_aux_hidden_state_layer_ids {ids} do not fit target '{target.name}' "
                            f"({target.num_layers} layers; ids 1..{target.num_layers}, the embedding (0) is not read)")
        cfg.layers = [int(j) - 1 for j in ids]
    if int(config.get("vocab_size", cfg.vocab_size)) != cfg.vocab_size:
        raise UserError(f"{src}: vocab_size is {config['vocab_size']} in the checkpoint but {cfg.vocab_size} in the "
                        "target: import it for the target it was trained with")
    if config.get("norm_before_residual"):
        raise UserError(f"{src} uses norm_before_residual, which this harness does not implement")
    _check_sizes(cfg, config, src)
    cfg.extra = dict(imported_from=str(src), source_layout="EAGLE-3 (LlamaForCausalLMEagle3)")
    head = new_head(cfg)
    own = head.state_dict()
    state = {}
    for name, ref in own.items():
        if name == "t2d":
            continue
        if name.endswith("_proj.bias") and name not in tensors:
            state[name] = torch.zeros_like(ref)
            continue
        t = _need(tensors, name, ref.shape, src)
        state[name] = t.long() if name == "d2t" else t.float()
    target_ids = torch.arange(N) + state["d2t"]
    if target_ids.min() < 0 or target_ids.max() >= cfg.vocab_size or len(target_ids.unique()) != N:
        raise UserError(f"{src}: d2t does not map the draft vocabulary to distinct target ids (expected offsets: "
                        "target id = draft id + d2t[draft id])")
    state["t2d"] = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    state["t2d"][target_ids] = True
    if "t2d" in tensors and not torch.equal(tensors["t2d"].bool(), state["t2d"]):
        raise UserError(f"{src}: t2d disagrees with d2t (t2d[target id] must be true exactly for the draft vocabulary)")
    unknown = sorted(set(tensors) - set(own) - set(IGNORED))
    if unknown:
        raise UserError(f"{src} has tensors this harness does not map ({', '.join(unknown[:4])}): not an EAGLE-3 "
                        "checkpoint of the LlamaForCausalLMEagle3 layout")
    head.load_state_dict(state)
    return save_head(head, out, dtype=torch.float32)


def eagle3_config(cfg: HeadConfig, dtype: torch.dtype) -> dict:
    """The LlamaForCausalLMEagle3 config.json of an eagle3 head."""
    ids = [layer + 1 for layer in cfg.layers]
    return {
        "architectures": [EAGLE3_ARCH], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "attention_bias": cfg.attention_bias, "mlp_bias": False, "max_position_embeddings": cfg.max_positions,
        "vocab_size": cfg.vocab_size, "draft_vocab_size": cfg.draft_vocab or cfg.vocab_size,
        "target_hidden_size": cfg.hidden_size, "tie_word_embeddings": False, "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids": ids,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
        "torch_dtype": str(dtype).removeprefix("torch."),
        "spec_harness": {"target": cfg.target, "fingerprint": cfg.fingerprint, "format_version": cfg.format_version},
    }


def export_head(folder: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes eagle3 head `folder` as an EAGLE-3 checkpoint (config.json + model.safetensors) in `out`."""
    from safetensors.torch import load_file, save_file

    cfg = read_config(folder)
    if cfg.variant != "eagle3":
        raise UserError(f"{folder} is an '{cfg.variant}' head: export-head writes eagle3 heads (the layout vLLM "
                        "and SGLang load); train one with `spec-harness train-head --variant eagle3`")
    state = load_file(str(Path(folder) / "model.safetensors"))
    own = new_head(cfg).state_dict()
    if set(state) != set(own):
        raise UserError(f"head weights in {folder} do not match its config.json: retrain the head")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tensors["d2t"] = tensors["d2t"].long()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(eagle3_config(cfg, dtype), indent=2) + "\n")
    return out


def cmd_import(args: argparse.Namespace) -> int:
    from harness.targets import load_target

    _fresh(Path(args.out), args.overwrite)
    if not Path(args.src).is_dir():
        raise UserError(f"checkpoint folder {args.src} not found: check the path")
    target = load_target(args.target, backend="native", device="cpu", dtype="float32")
    out = import_head(args.src, target, args.out)
    cfg = read_config(out)
    print(f"imported {args.src} as an {cfg.variant} head for '{target.name}' (layers {cfg.layers}): {out}/ "
          f"(run with --drafters {cfg.variant} --head {out})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _fresh(Path(args.out), args.overwrite)
    out = export_head(args.head, args.out, getattr(torch, args.dtype))
    print(f"wrote {out}/ (LlamaForCausalLMEagle3): vLLM speculative_config={{'method': 'eagle3', 'model': '{out}'}}")
    return 0
