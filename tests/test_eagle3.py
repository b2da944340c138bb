"""EAGLE-3 heads and interop: the exported layout is the one vLLM / SGLang load (names, shapes, config),
export -> import gives identical drafts, a SafeAILab EAGLE-1/2 checkpoint imports exactly, d2t / t2d semantics,
and refusals of checkpoints that do not fit."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_eagle import TREE, random_head, run

from harness.cli import main
from harness.drafters.ar import AR
from harness.drafters.eagle import EagleDrafter
from harness.drafters.eagle3 import init_eagle3
from harness.drafters.heads import Frozen, config_for_target, default_layers, load_head, save_head
from harness.drafters.interop import export_head, import_head
from harness.errors import UserError
from harness.targets import build_target
from harness.targets.native import rms_norm

H, V, I, HQ, HKV, D = 64, 259, 128, 4, 2, 16  # conftest's tiny Llama


def tiny_target(layers=6):
    return build_target(tiny_model(layers=layers), None, "tiny", "native", max_len=256)


def test_default_aux_layers_are_vllms():
    """vLLM's default aux ids (2, L/2, L-3) count layer inputs; the harness stores layer outputs (id - 1)."""
    assert default_layers("eagle3", 30) == [1, 14, 26]
    assert default_layers("eagle3", 32) == [1, 15, 28]
    assert default_layers("eagle", 30) == [-1]


def test_exported_layout_is_what_vllm_loads(tmp_path):
    target = tiny_target()
    head, _ = random_head(target, "eagle3", draft_vocab=80)
    save_head(head, tmp_path / "h")
    export_head(tmp_path / "h", tmp_path / "x")
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 80 and cfg["vocab_size"] == V and cfg["hidden_size"] == H
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3] == [x + 1 for x in head.cfg.layers]
    assert cfg["tie_word_embeddings"] is False and cfg["norm_before_residual"] is False
    t = load_file(str(tmp_path / "x" / "model.safetensors"))
    want = {
        "fc.weight": (H, 3 * H),
        "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (HQ * D, 2 * H), "midlayer.self_attn.k_proj.weight": (HKV * D, 2 * H),
        "midlayer.self_attn.v_proj.weight": (HKV * D, 2 * H), "midlayer.self_attn.o_proj.weight": (H, HQ * D),
        "midlayer.mlp.gate_proj.weight": (I, H), "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,), "lm_head.weight": (80, H), "d2t": (80,), "t2d": (V,),
    }
    assert {k: tuple(v.shape) for k, v in t.items()} == want  # no fc.bias, no embedding (the target's is shared)
    assert t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool and t["fc.weight"].dtype == torch.bfloat16


def test_d2t_offsets_and_t2d_mask():
    target = tiny_target()
    cfg = config_for_target(target, "eagle3", draft_vocab=5)
    counts = torch.zeros(V)
    counts[torch.tensor([200, 7, 31, 150, 9, 100])] = torch.tensor([9.0, 8, 7, 6, 5, 1])
    head = init_eagle3(cfg, Frozen.of(target), 0, counts)
    ids = torch.tensor([7, 9, 31, 150, 200])  # the 5 most frequent, sorted
    assert torch.equal(head.target_ids(), ids)
    assert torch.equal(head.d2t, ids - torch.arange(5))  # offsets: target id = draft id + d2t[draft id]
    assert head.t2d.sum() == 5 and bool(head.t2d[ids].all()) and not bool(head.t2d[100])
    torch.testing.assert_close(head.lm_head.weight, Frozen.of(target).lm_head[ids])  # starts from the target's rows
    logits = torch.arange(5.0)[None]
    full = head.to_target_vocab(logits)
    assert full.shape == (1, V) and torch.equal(full[0, ids], logits[0])
    assert torch.isinf(full[0, ~head.t2d]).all()


def test_export_import_round_trip_drafts_identically(tmp_path):
    target = tiny_target()
    head, frozen = random_head(target, "eagle3", draft_vocab=90, scale=6.0)
    save_head(head, tmp_path / "h", dtype=torch.float32)
    export_head(tmp_path / "h", tmp_path / "x", dtype=torch.float32)
    import_head(tmp_path / "x", target, tmp_path / "back")
    back = load_head(tmp_path / "back", target, "eagle3")
    assert back.cfg.layers == head.cfg.layers and back.cfg.draft_vocab == 90
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    for tree in (None, TREE):
        a = run(target, EagleDrafter(head, frozen, "eagle3", tree, 256, target.device))
        b = run(target, EagleDrafter(back, frozen, "eagle3", tree, 256, target.device))
        assert a.new_ids == b.new_ids == run(target, EagleDrafter(head, frozen, "eagle3", tree, 256,
                                                                  target.device)).new_ids
        assert [s["accepted"] for s in a.steps] == [s["accepted"] for s in b.steps]
    # the CLI does the same, and refuses an eagle head
    assert main(["export-head", str(tmp_path / "h"), "--out", str(tmp_path / "x2")]) == 0
    eagle, _ = random_head(target, "eagle")
    save_head(eagle, tmp_path / "e")
    with pytest.raises(UserError, match="export-head writes eagle3"):
        export_head(tmp_path / "e", tmp_path / "x3")


def _safeailab_eagle1(folder, gen, bias=True, extra=None):
    """A checkpoint in SafeAILab's EAGLE-1/2 layout, written by hand from the documented names."""
    folder.mkdir(parents=True, exist_ok=True)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.2  # noqa: E731
    t = {"fc.weight": r(H, 2 * H), "layers.0.self_attn.q_proj.weight": r(HQ * D, H),
         "layers.0.self_attn.k_proj.weight": r(HKV * D, H), "layers.0.self_attn.v_proj.weight": r(HKV * D, H),
         "layers.0.self_attn.o_proj.weight": r(H, HQ * D), "layers.0.mlp.gate_proj.weight": r(I, H),
         "layers.0.mlp.up_proj.weight": r(I, H), "layers.0.mlp.down_proj.weight": r(H, I),
         "layers.0.post_attention_layernorm.weight": 1 + r(H)}
    if bias:
        t["fc.bias"] = r(H)
    t.update(extra or {})
    torch.save(t, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=H, intermediate_size=I,
        num_attention_heads=HQ, num_key_value_heads=HKV, num_hidden_layers=1, rms_norm_eps=1e-6, vocab_size=V,
        bias=bias)))
    return t


@pytest.mark.parametrize("bias", [True, False])
def test_safeailab_eagle1_checkpoint_imports_exactly(tmp_path, bias):
    """One row through the imported head equals EAGLE-1's formula written from the raw tensors: input
    fc([embed ; feature]) (no norm on either), attention over the row itself (its v), no input norm, the
    post-attention norm and the MLP."""
    target = tiny_target()
    t = _safeailab_eagle1(tmp_path / "ck", torch.Generator().manual_seed(0), bias=bias)
    import_head(tmp_path / "ck", target, tmp_path / "h")
    head = load_head(tmp_path / "h", target, "eagle")
    assert head.cfg.layout == "safeailab" and head.cfg.layers == [-1]
    gen = torch.Generator().manual_seed(1)
    e, f = torch.randn(1, 1, H, generator=gen), torch.randn(1, 1, H, generator=gen) * 30
    x = head.inputs(e, f)
    cos, sin = head.rope(torch.zeros(1, 1, dtype=torch.long), x.dtype)
    q, k, v = head.layer.qkv(x, cos, sin)
    out = head.layer.finish(x, head.layer.attend(q, k, v, None))
    x_ref = torch.cat([e, f], -1) @ t["fc.weight"].T + (t["fc.bias"] if bias else 0)
    v_ref = (x_ref @ t["layers.0.self_attn.v_proj.weight"].T).view(1, 1, HKV, D)
    att = v_ref.repeat_interleave(HQ // HKV, dim=2).reshape(1, 1, HQ * D)  # one key: attention returns v
    r = x_ref + att @ t["layers.0.self_attn.o_proj.weight"].T
    n = rms_norm(r, t["layers.0.post_attention_layernorm.weight"], 1e-6)
    mlp = (F.silu(n @ t["layers.0.mlp.gate_proj.weight"].T) * (n @ t["layers.0.mlp.up_proj.weight"].T))
    torch.testing.assert_close(out, r + mlp @ t["layers.0.mlp.down_proj.weight"].T, atol=1e-4, rtol=1e-4)
    # and it drafts losslessly
    ref = run(target, AR()).new_ids
    assert run(target, EagleDrafter(head, Frozen.of(target), "eagle", None, 256, target.device)).new_ids == ref


def test_import_refuses_what_does_not_fit(tmp_path):
    target = tiny_target()
    gen = torch.Generator().manual_seed(0)
    _safeailab_eagle1(tmp_path / "a", gen, extra={"layers.0.weird.weight": torch.zeros(3)})
    with pytest.raises(UserError, match="does not map"):
        import_head(tmp_path / "a", target, tmp_path / "ha")
    _safeailab_eagle1(tmp_path / "b", gen, extra={"embed_tokens.weight": torch.randn(V, H)})
    with pytest.raises(UserError, match="own embed_tokens"):
        import_head(tmp_path / "b", target, tmp_path / "hb")
    emb = Frozen.of(target).embed.clone()
    _safeailab_eagle1(tmp_path / "c", gen, extra={"embed_tokens.weight": emb})  # the target's own: accepted
    import_head(tmp_path / "c", target, tmp_path / "hc")
    # an EAGLE-3 checkpoint with d2t that is not an offset map, or aux ids beyond the target
    head, _ = random_head(target, "eagle3", draft_vocab=40)
    save_head(head, tmp_path / "h3", dtype=torch.float32)
    export_head(tmp_path / "h3", tmp_path / "x3", dtype=torch.float32)
    st = load_file(str(tmp_path / "x3" / "model.safetensors"))
    st["d2t"] = head.target_ids().clone()  # absolute ids (the old layout), not offsets
    save_file(st, str(tmp_path / "x3" / "model.safetensors"))
    with pytest.raises(UserError, match="d2t"):
        import_head(tmp_path / "x3", target, tmp_path / "bad")
    export_head(tmp_path / "h3", tmp_path / "x4", dtype=torch.float32)
    cfg = json.loads((tmp_path / "x4" / "config.json").read_text())
    cfg["eagle_aux_hidden_state_layer_ids"] = [2, 3, 40]
    (tmp_path / "x4" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="eagle_aux_hidden_state_layer_ids"):
        import_head(tmp_path / "x4", target, tmp_path / "bad4")
    assert main(["import-head", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_old_eagle3_folders_are_refused(tmp_path):
    target = tiny_target()
    head, _ = random_head(target, "eagle3", draft_vocab=40)
    save_head(head, tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    cfg["format_version"] = 1
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="pre-EAGLE-3 layout"):
        load_head(tmp_path / "h", target, "eagle3")


def test_eagle3_equals_ar_with_a_reduced_vocabulary():
    """Through the decode loop, chains and trees: drafts only from the draft vocabulary, output = ar's."""
    target = tiny_target()
    ref = run(target, AR()).new_ids
    head, frozen = random_head(target, "eagle3", draft_vocab=30, scale=4.0)
    allowed = set(head.target_ids().tolist())
    for tree in (None, TREE):
        drafter = EagleDrafter(head, frozen, "eagle3", tree, 256, target.device)
        out = run(target, drafter)
        assert out.new_ids == ref
    prop_tokens = []

    class Spy(EagleDrafter):
        def propose(self, ctx):
            p = super().propose(ctx)
            prop_tokens.extend(p.tokens[0, 1:].tolist() if p.parents is not None else p.tokens[0].tolist())
            return p

    run(target, Spy(head, frozen, "eagle3", TREE, 256, target.device))
    assert prop_tokens and set(prop_tokens) <= allowed


def test_one_row_computes_eagle3_from_the_exported_tensors(tmp_path):
    """The head's computation, written from the exported names alone: q/k/v read
    [input_layernorm(embed) ; hidden_norm(g)], the residual is g = fc(aux), then post-attention norm + MLP,
    logits = lm_head(norm(out)) placed at target id = draft id + d2t."""
    target = tiny_target()
    head, frozen = random_head(target, "eagle3", draft_vocab=50, scale=3.0)
    with torch.no_grad():
        for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            getattr(head.midlayer, name).weight.uniform_(0.5, 1.5)
        head.norm.weight.uniform_(0.5, 1.5)
    save_head(head, tmp_path / "h", dtype=torch.float32)
    export_head(tmp_path / "h", tmp_path / "x", dtype=torch.float32)
    t = load_file(str(tmp_path / "x" / "model.safetensors"))
    eps = json.loads((tmp_path / "x" / "config.json").read_text())["rms_norm_eps"]
    gen = torch.Generator().manual_seed(0)
    aux = {layer: torch.randn(1, 1, H, generator=gen) * 5 for layer in head.cfg.layers}
    e = torch.randn(1, 1, H, generator=gen)
    g = head.features(aux)
    x = head.inputs(e, g)
    cos, sin = head.rope(torch.zeros(1, 1, dtype=torch.long), x.dtype)
    q, k, v = head.layer.qkv(x, cos, sin)
    out = head.layer.finish(x, head.layer.attend(q, k, v, None))
    logits = head.to_target_vocab(head.logits(out))
    m = "midlayer."
    g_ref = torch.cat([aux[layer] for layer in head.cfg.layers], -1) @ t["fc.weight"].T
    hcat = torch.cat([rms_norm(e, t[m + "input_layernorm.weight"], eps), rms_norm(g_ref, t[m + "hidden_norm.weight"], eps)], -1)
    v_ref = (hcat @ t[m + "self_attn.v_proj.weight"].T).view(1, 1, HKV, D)
    att = v_ref.repeat_interleave(HQ // HKV, dim=2).reshape(1, 1, HQ * D)
    r = g_ref + att @ t[m + "self_attn.o_proj.weight"].T
    n = rms_norm(r, t[m + "post_attention_layernorm.weight"], eps)
    o_ref = r + (F.silu(n @ t[m + "mlp.gate_proj.weight"].T) * (n @ t[m + "mlp.up_proj.weight"].T)) @ t[m + "mlp.down_proj.weight"].T
    torch.testing.assert_close(out, o_ref, atol=1e-4, rtol=1e-4)
    draft = rms_norm(o_ref, t["norm.weight"], eps) @ t["lm_head.weight"].T  # [1, 1, N]
    ids = torch.arange(50) + t["d2t"]
    torch.testing.assert_close(logits[..., ids], draft, atol=1e-4, rtol=1e-4)
    assert torch.isinf(logits[..., ~t["t2d"]]).all()


@pytest.mark.slow
def test_shipped_smollm2_eagle3_head_is_lossless_and_accepts():
    from harness.config import RunConfig
    from harness.drafters import build_drafter
    from harness.engine.scheduler import decode
    from harness.targets.chat import eos_ids, prompt_ids
    from harness.targets import load_target

    target = load_target("smollm2-135m", backend="native", device="cpu", dtype="float32", max_len=512)
    eos = eos_ids(target)
    drafter = build_drafter("eagle3", target, RunConfig())
    assert drafter.head.cfg.draft_vocab == 8192 and drafter.head.cfg.layers == [1, 14, 26]
    accepted = steps = 0
    for text in ("Give me three tips for staying focused while studying.", "What is a prime number?"):
        ids = prompt_ids(target.tokenizer, [{"role": "user", "content": text}])
        kw = dict(max_new_tokens=32, k=2, temperature=0.0, seed=0, eos_ids=eos)
        out = decode(target, drafter, ids, **kw)
        assert out.new_ids == decode(target, AR(), ids, **kw).new_ids
        accepted += sum(s["accepted"] for s in out.steps)
        steps += len(out.steps)
    assert accepted / steps > 0.1  # mean accepted drafts per step (0.28 measured on 4 mt-bench questions)


@pytest.mark.parametrize("variant", ["eagle", "eagle3", "block"])
def test_greedy_chain_without_q_drafts_the_same_tokens(variant):
    """With nothing reading q (T = 0, no meter: want_q False) a chain's tokens are those of the full path
    (softmax over the target vocabulary, then argmax) and q is left None; with want_q the q is there."""
    from test_block import random_block

    from harness.drafters.base import Committed, DraftContext
    from harness.drafters.block import BlockDrafter

    target = tiny_target()
    if variant == "block":
        head, frozen = random_block(target, scale=1.0, draft_vocab=60)
        make = lambda: BlockDrafter(head, frozen, "block", 256, target.device)  # noqa: E731
    else:
        head, frozen = random_head(target, variant, draft_vocab=60 if variant == "eagle3" else 0, scale=1.0)
        make = lambda: EagleDrafter(head, frozen, variant, None, 256, target.device)  # noqa: E731
    if variant != "eagle":  # a draft vocabulary with gaps: draft id != target id
        V = head.cfg.vocab_size
        ids = torch.randperm(V, generator=torch.Generator().manual_seed(3))[:60].sort().values
        head.set_vocab(ids)
        assert (head.target_ids() != torch.arange(60)).any()
    prompt = [1, 5, 9, 2, 7, 3, 8, 4, 6, 5, 9]
    props = {}
    for want_q in (True, False):
        target.reset(1)
        out = target.forward(torch.tensor([prompt[:-1]]), hidden_layers=tuple(head.cfg.layers))
        target.commit(torch.tensor([len(prompt) - 1]))
        ctx = DraftContext(history=[list(prompt)], k=4, temperature=0.0, seed=0, device=target.device,
                           prefill_hidden=out.hidden, want_q=want_q)
        drafter = make()
        drafter.begin(ctx)
        drafter.begin_row(ctx, 0)
        props[want_q] = [drafter.propose(ctx)]
        emitted = props[want_q][0].tokens[0, :2].tolist() + [11]  # keep two drafts, then a correction
        ctx.history[0].extend(emitted)
        ctx.hidden = {h: torch.randn(1, 3, head.cfg.hidden_size, generator=torch.Generator().manual_seed(h))
                      for h in head.cfg.layers}
        drafter.observe(ctx, Committed(num_accepted=torch.tensor([2]), accepted=[2], emitted=[emitted]))
        props[want_q].append(drafter.propose(ctx))
    for full, lean in zip(props[True], props[False]):
        assert lean.q is None and full.q is not None and full.q.shape[:2] == (1, 4)
        assert lean.tokens.tolist() == full.tokens.tolist()
    assert len(set(props[False][0].tokens[0].tolist() + props[False][1].tokens[0].tolist())) > 1


def test_a_meter_at_temperature_zero_still_gets_the_heads_q():
    """The scheduler asks for q whenever a meter is attached (want_q), also at T = 0: the step records of an
    eagle3 chain then carry the head's draft entropy h_draft (a one-hot q would give 0)."""
    from conftest import byte_tokenizer
    from test_engine import prompts

    from harness.config import RunConfig
    from harness.engine.scheduler import Scheduler
    from harness.meter.core import build_meter

    target = build_target(tiny_model(layers=6), byte_tokenizer(), "tiny", "native", max_len=320)
    head, frozen = random_head(target, "eagle3", draft_vocab=60, scale=4.0)
    got = {}
    Scheduler(target, EagleDrafter(head, frozen, "eagle3", None, 320, target.device), name="d", batch_size=1,
              max_new_tokens=8, k=3, temperature=0.0, seed=0, eos_ids=set(), catch=False,
              new_meter=lambda: build_meter(RunConfig(meter=True, k=3), target),
              on_finish=lambda p, f, st: got.setdefault(p.prompt_id, st)).run(prompts()[:1])
    steps = [s for st in got.values() for s in st if s["drafted"]]
    assert steps and all(h is not None and h > 1e-3 for s in steps for h in s["h_draft"][:1])  # one-hot q: 0
