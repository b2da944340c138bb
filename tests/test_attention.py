"""Attention backends (harness.targets.attention): every selectable path equals the original SDPA call on
the shapes the native target uses, and the choice is made once, from the environment or a check."""

import importlib

import pytest
import torch
from conftest import tiny_model

from harness.errors import UserError
from harness.targets import build_target
from harness.targets.attention import (BACKENDS, ENV, HEAD_ENV, attend, case_inputs, check_backend, choose_attention,
                                       head_attention, reference, shape_cases)
from harness.targets.base import causal_or_tree_mask

CPU_BACKENDS = [b for b in BACKENDS if b not in ("fold-efficient", "fold-cudnn")]  # those two are CUDA kernels
HEADS = [(4, 2, 16), (9, 3, 64), (4, 4, 8)]  # (Hq, Hkv, D): the tiny model, SmolLM2-135M, no GQA


def model_masks():
    """Masks as NativeTarget builds them: prefill, 1-token decode, K+1 verify, a tree, a ragged batch."""
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                        dtype=torch.bool)[None]
    return {
        "prefill": causal_or_tree_mask(torch.tensor([0]), 23, 23, None),
        "decode": causal_or_tree_mask(torch.tensor([17]), 1, 64, None),
        "verify": causal_or_tree_mask(torch.tensor([17]), 6, 64, None),
        "tree": causal_or_tree_mask(torch.tensor([30]), 5, 64, tree),
        "ragged": causal_or_tree_mask(torch.tensor([3, 40, 0]), 4, 64, None),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("heads", HEADS)
def test_backends_equal_sdpa_on_model_masks(backend, heads):
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(1)
    for kind, mask in model_masks().items():
        B, _, T, S = mask.shape
        q = torch.randn(B, T, hq, d, generator=gen).transpose(1, 2)  # [B, Hq, T, D] as the model makes it
        k, v = torch.randn(B, hkv, S, d, generator=gen), torch.randn(B, hkv, S, d, generator=gen)
        want = attend(q, k, v, mask, "sdpa-gqa")
        torch.testing.assert_close(attend(q, k, v, mask, backend), want, atol=1e-5, rtol=1e-5, msg=kind)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_match_reference_on_probe_shapes(backend):
    """The shapes check_backend and the probe use (static span 256 here), in fp32 and bf16."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for kind, B, T, S in shape_cases(batch=3, max_len=256, tree=20, prefill=37):
            q, k, v, mask = case_inputs(B, T, S, 9, 3, 64, "cpu", dtype)
            err = (attend(q, k, v, mask, backend).float() - reference(q, k, v, mask)).abs().max().item()
            assert err <= tol, (kind, dtype, err)
        assert check_backend(backend, torch.device("cpu"), dtype, 9, 3, 64, max_len=256) is None


def test_check_backend_reports_a_kernel_that_cannot_run():
    why = check_backend("fold-cudnn", torch.device("cpu"), torch.float32, 9, 3, 64, max_len=256)
    assert why is not None and why.startswith("decode")


def test_check_backend_reports_a_wrong_result(monkeypatch):
    import harness.targets.attention as attention

    right = attention.attend
    monkeypatch.setattr(attention, "attend", lambda q, k, v, m, b: right(q, k, v, m, b) * (1 + 1e-3))
    why = check_backend("manual", torch.device("cpu"), torch.float32, 9, 3, 64, max_len=256)
    assert why is not None and "max difference" in why


def test_choice_cpu_default_and_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert choose_attention(torch.device("cpu"), torch.float32, 4, 2, 16) == "sdpa-gqa"
    monkeypatch.setenv(ENV, "manual")
    assert choose_attention(torch.device("cpu"), torch.float32, 4, 2, 16) == "manual"
    target = build_target(tiny_model(), None, "tiny", "native", max_len=32)
    assert {b.attention for b in target.model.blocks} == {"manual"}
    native = importlib.import_module("harness.targets.native")
    used, right = [], native.attend
    monkeypatch.setattr(native, "attend", lambda q, k, v, m, b: used.append(b) or right(q, k, v, m, b))
    target.prefill(torch.tensor([[1, 2, 3]]))
    assert used == ["manual"] * target.num_layers  # every layer's forward ran the chosen backend
    monkeypatch.setenv(ENV, "flash")
    with pytest.raises(UserError, match="not an attention backend"):
        choose_attention(torch.device("cpu"), torch.float32, 4, 2, 16)


@pytest.mark.parametrize("backend", ["fold", "fold-math", "manual"])
def test_native_target_logits_equal_across_backends(backend, monkeypatch):
    """Prefill, chain verify and a tree step through the whole model, static span, ragged batch of 2."""
    model = tiny_model()
    outs = {}
    for name in ("sdpa-gqa", backend):
        monkeypatch.setenv(ENV, name)
        t = build_target(model, None, "tiny", "native", max_len=48, static=True)
        t.reset(2)
        logits = [t.prefill(torch.arange(40, 57).view(1, 17).repeat(2, 1)).logits]
        t.commit(torch.tensor([-5, 0]))  # ragged: row 0 keeps 12 tokens, row 1 keeps 17
        logits.append(t.forward(torch.tensor([[3, 4, 5], [6, 7, 8]])).logits)
        tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)[None].repeat(2, 1, 1)
        pos = t.lengths[:, None] + torch.tensor([[0, 1, 1]])
        logits.append(t.forward(torch.tensor([[9, 10, 11]] * 2), positions=pos, tree_mask=tree).logits)
        outs[name] = logits
    for a, b in zip(outs["sdpa-gqa"], outs[backend]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chooser,env,allowed", [(choose_attention, ENV, BACKENDS),
                                                 (head_attention, HEAD_ENV, ("fold-efficient", "manual"))],
                         ids=["target", "head"])
def test_cuda_choice_works_on_every_shape(dtype, chooser, env, allowed, monkeypatch):
    monkeypatch.delenv(env, raising=False)
    dev = torch.device("cuda")
    chosen = chooser(dev, dtype, 9, 3, 64)
    assert chosen in allowed and check_backend(chosen, dev, dtype, 9, 3, 64) is None


def test_head_choice_avoids_cudnn_whatever_the_target_uses(monkeypatch):
    """Draft heads attend over a cache whose length changes every call: on CUDA never a cuDNN backend (a plan
    per new shape), even when SPEC_HARNESS_ATTENTION pins the target to one; a CPU keeps sdpa-gqa."""
    attention = importlib.import_module("harness.targets.attention")
    monkeypatch.delenv(HEAD_ENV, raising=False)
    monkeypatch.setenv(ENV, "sdpa-gqa")
    assert head_attention(torch.device("cpu"), torch.float32, 9, 3, 64) == "sdpa-gqa"
    tried = []
    works = {"fold-efficient": False, "manual": True, "fold-cudnn": True, "sdpa-gqa": True}
    monkeypatch.setattr(attention, "check_backend",
                        lambda b, *a, **k: tried.append(b) or (None if works[b] else "refused"))
    attention._choose_cuda.cache_clear()
    try:
        assert head_attention(torch.device("cuda"), torch.bfloat16, 9, 3, 64) == "manual"
        assert tried == ["fold-efficient", "manual"]
        works["fold-efficient"] = True
        attention._choose_cuda.cache_clear()
        assert head_attention(torch.device("cuda"), torch.bfloat16, 9, 3, 64) == "fold-efficient"
        assert choose_attention(torch.device("cuda"), torch.bfloat16, 9, 3, 64) == "sdpa-gqa"  # the target's pin
        monkeypatch.setenv(HEAD_ENV, "fold-math")
        assert head_attention(torch.device("cuda"), torch.bfloat16, 9, 3, 64) == "fold-math"
        monkeypatch.setenv(HEAD_ENV, "flash")
        with pytest.raises(UserError, match=HEAD_ENV):
            head_attention(torch.device("cpu"), torch.float32, 9, 3, 64)
    finally:
        attention._choose_cuda.cache_clear()


@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
def test_head_layers_use_the_head_backend(variant, monkeypatch):
    from harness.drafters.heads import HeadLayer
    from harness.targets.native import LlamaSpec

    spec = LlamaSpec(vocab_size=259, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=16, rms_eps=1e-6, rope_theta=1e4, rope_scaling=None, attention_bias=False)
    if variant == "eagle":
        layer, module = HeadLayer(spec), importlib.import_module("harness.drafters.heads")
    else:
        module = importlib.import_module("harness.drafters.eagle3")
        layer = module.MidLayer(spec)
    q, k, v, mask = case_inputs(1, 5, 24, 4, 2, 16, "cpu", torch.float32)
    used, right = [], module.attend
    monkeypatch.setattr(module, "attend", lambda q, k, v, m, b: used.append(b) or right(q, k, v, m, b))
    monkeypatch.setenv(ENV, "fold-math")  # the target's choice: not the heads'
    outs = {}
    for name in ("sdpa-gqa", "manual"):
        monkeypatch.setenv(HEAD_ENV, name)
        outs[name] = layer.attend(q, k, v, mask[:1])  # the head's masks broadcast over the batch
    assert used == ["sdpa-gqa", "manual"]
    torch.testing.assert_close(outs["manual"], outs["sdpa-gqa"], atol=1e-5, rtol=1e-5)
