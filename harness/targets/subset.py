"""`spec-harness subset-model`: a draft model made from the target by leaving decoder layers out, written
as a transformers folder (config.json, model.safetensors, tokenizer) that our `model` drafter
(--draft-model DIR) and vLLM's draft_model method (`vllm-draft --draft-model DIR`) both load.

It is the target with the layers in --skip-layers removed, nothing trained: the same vocabulary, embedding,
final norm and LM head. Skipping a suffix (`--skip-layers 10-29` on a 30-layer model) is early exit, the
draft `layerskip` runs in-process; skipping middle layers is the draft `selfspec` runs. It is the honest
way to get a draft model with SmolLM2's vocabulary offline; a small model trained for the job would
accept more.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from harness.errors import UserError


def parse_layers(spec: str) -> tuple[int, ...]:
    """'14,15' or '10-29' or '3,8-10' -> sorted distinct layer indices."""
    out: set[int] = set()
    try:
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            lo, dash, hi = part.partition("-")
            a, b = int(lo), int(hi) if dash else int(lo)
            if b < a:
                raise ValueError(part)
            out.update(range(a, b + 1))
    except ValueError:
        raise UserError(f"--skip-layers '{spec}' is not a list of layers: write e.g. 14,15 or 10-29") from None
    return tuple(sorted(out))


def write_subset(folder: str | Path, skip: tuple[int, ...], out: str | Path, source: str = "") -> Path:
    """Writes the transformers model in `folder` without the decoder layers in `skip` to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    L = AutoConfig.from_pretrained(str(folder)).num_hidden_layers
    if not skip or skip[0] < 0 or skip[-1] >= L or len(skip) >= L:
        raise UserError(f"--skip-layers must name between 1 and {L - 1} distinct layers in 0..{L - 1}, got "
                        f"{','.join(map(str, skip)) or 'none'}")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    layers = model.model.layers
    keep = [i for i in range(L) if i not in skip]
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    for j, layer in enumerate(model.model.layers):  # caches are indexed by the new position
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = j
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.spec_harness = {"subset_of": source or str(folder), "skipped_layers": list(skip), "kept_layers": keep}
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def register(sub) -> None:
    p = sub.add_parser("subset-model", help="write the target without some layers as a draft model folder",
                       description="Write the target with the decoder layers in --skip-layers left out, as a "
                                   "transformers folder: a draft model with the target's vocabulary for "
                                   "--drafters model or vllm-draft (--draft-model OUT).")
    p.add_argument("--target", default="smollm2-135m", help="preset, transformers folder or .gguf")
    p.add_argument("--skip-layers", required=True, help="layers to leave out, e.g. 10-29 (early exit) or 14,15")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_subset)


def cmd_subset(args: argparse.Namespace) -> int:
    from harness.targets.loading import resolve_source

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"output folder {out} exists: pass --overwrite to replace it")
    skip = parse_layers(args.skip_layers)
    folder = resolve_source(args.target)[1]
    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"target '{args.target}' is not a local transformers folder: download it first")
    write_subset(folder, skip, out, source=args.target)
    kept = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    print(f"wrote {out}/ ({args.target} with {kept} layers, layers {args.skip_layers} left out): "
          f"--drafters model,vllm-draft --draft-model {out}")
    return 0
