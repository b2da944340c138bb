"""Both target backends against transformers' own forward: logits, rollback, tree masks, compaction."""

import warnings

import pytest
import torch
from conftest import tiny_model

from harness.errors import UserError
from harness.targets import build_target


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("backend", ["native", "hf"])
def test_incremental_matches_full_forward(model_type, backend):
    extra = {"attention_bias": True} if model_type == "llama" else {}
    model = tiny_model(model_type, **extra)
    target = build_target(model, None, "tiny", backend, max_len=128)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 259, (30,), generator=g).tolist()
    ref = full_logits(model, seq)
    out = target.prefill(torch.tensor([seq[:10]]))
    torch.testing.assert_close(out.logits[0], ref[:10], atol=2e-5, rtol=0)
    # verify 4 tokens, keep 2 (rollback the rest by moving the pointer), then continue
    junk = torch.tensor([[seq[10], seq[11], 5, 6]])
    target.forward(junk)
    target.commit(torch.tensor([2]))
    out = target.forward(torch.tensor([seq[12:20]]))
    torch.testing.assert_close(out.logits[0], ref[12:20], atol=2e-5, rtol=0)
    assert int(target.lengths[0]) == 12


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_tree_mask_and_compaction(backend):
    model = tiny_model()
    target = build_target(model, None, "tiny", backend, max_len=128)
    prompt = list(range(20, 32))
    target.prefill(torch.tensor([prompt]))
    # root r=5 with children 7 (node 1) and 9 (node 2); node 3 = 11 is a child of node 1
    tokens = torch.tensor([[5, 7, 9, 11]])
    mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]], dtype=torch.bool)
    positions = torch.tensor([[12, 13, 13, 14]])
    out = target.forward(tokens, positions=positions, tree_mask=mask)
    ref_a = full_logits(model, prompt + [5, 7, 11])[12:]
    ref_b = full_logits(model, prompt + [5, 9])[13]
    torch.testing.assert_close(out.logits[0, [0, 1, 3]], ref_a, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.logits[0, 2], ref_b, atol=2e-5, rtol=0)
    target.commit_path(torch.tensor([[0, 1, 3]]), torch.tensor([3]))  # keep r, 7, 11
    out = target.forward(torch.tensor([[13, 14]]))
    torch.testing.assert_close(out.logits[0], full_logits(model, prompt + [5, 7, 11, 13, 14])[15:], atol=2e-5, rtol=0)


def test_hf_backend_gemma3_within_its_window():
    """gemma3's sliding-window layers through the hf backend, all tokens inside the window (64)."""
    model = tiny_model("gemma3_text", head_dim=16, sliding_window=64,
                       layer_types=["sliding_attention", "full_attention"] * 2)
    target = build_target(model, None, "tiny", "hf", max_len=128)
    seq = torch.randint(0, 259, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = full_logits(model, seq)
    torch.testing.assert_close(target.prefill(torch.tensor([seq[:10]])).logits[0], ref[:10], atol=2e-5, rtol=0)
    target.forward(torch.tensor([[seq[10], 3, 4]]))
    target.commit(torch.tensor([1]))
    out = target.forward(torch.tensor([seq[11:24]]))
    torch.testing.assert_close(out.logits[0], ref[11:24], atol=2e-5, rtol=0)


def test_hf_backend_refuses_a_sequence_beyond_the_sliding_window():
    """Our causal mask overrides the sliding one: at window 16, token 17's logits are wrong, so refuse."""
    model = tiny_model("gemma3_text", head_dim=16, sliding_window=16,
                       layer_types=["sliding_attention", "full_attention"] * 2)
    target = build_target(model, None, "tiny", "hf", max_len=128)
    seq = torch.randint(0, 259, (17,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = full_logits(model, seq)
    torch.testing.assert_close(target.prefill(torch.tensor([seq[:16]])).logits[0], ref[:16], atol=2e-5, rtol=0)
    with pytest.raises(UserError, match=r"sequence of 17 tokens exceeds this model's sliding window \(16\)"):
        target.forward(torch.tensor([seq[16:]]))


def test_hf_backend_calls_no_deprecated_transformers_api():
    """transformers warns (FutureWarning) before it removes an argument, e.g. past_key_values in 5.40."""
    target = build_target(tiny_model(), None, "tiny", "hf", max_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        target.prefill(torch.tensor([list(range(10, 20))]), hidden_layers=(1,))
        target.forward(torch.tensor([[5, 6, 7]]))
        target.commit(torch.tensor([1]))
        target.forward(torch.tensor([[8]]))


def test_hidden_states_match_transformers():
    model = tiny_model()
    seq = list(range(40, 56))
    with torch.no_grad():
        hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    for backend in ("native", "hf"):
        target = build_target(model, None, "tiny", backend, max_len=64)
        out = target.prefill(torch.tensor([seq]), hidden_layers=(0, 2, -1))
        torch.testing.assert_close(out.hidden[0][0], hs[1][0], atol=1e-4, rtol=1e-5)  # output of layer 0
        torch.testing.assert_close(out.hidden[2][0], hs[3][0], atol=1e-4, rtol=1e-5)
        assert out.hidden[-1].shape == (1, 16, 64)  # last layer, before the final norm
        normed = model.model.norm(out.hidden[-1])
        torch.testing.assert_close(normed[0], hs[-1][0], atol=1e-4, rtol=1e-5)


def test_native_batch_with_ragged_lengths():
    model = tiny_model()
    target = build_target(model, None, "tiny", "native", max_len=64)
    a, b = list(range(30, 40)), list(range(60, 66))
    target.reset(2)
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0], ids[1, :6] = torch.tensor(a), torch.tensor(b)
    target.forward(ids)
    target.commit(torch.tensor([10, 6]))
    out = target.forward(torch.tensor([[1, 2], [3, 4]]))
    torch.testing.assert_close(out.logits[0], full_logits(model, a + [1, 2])[10:], atol=2e-5, rtol=0)
    torch.testing.assert_close(out.logits[1], full_logits(model, b + [3, 4])[6:], atol=2e-5, rtol=0)


def test_static_cache_span_gives_same_logits():
    model = tiny_model()
    dyn = build_target(model, None, "tiny", "native", max_len=64)
    sta = build_target(model, None, "tiny", "native", max_len=64, static=True)
    seq = torch.tensor([list(range(10, 30))])
    torch.testing.assert_close(dyn.prefill(seq).logits, sta.prefill(seq).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_native_matches_hf():
    from harness.targets import load_target

    native = load_target("smollm2-135m", backend="native", device="cpu", dtype="float32", max_len=64)
    ids = native.tokenizer("def fibonacci(n):\n    ", return_tensors="pt")["input_ids"]
    hf = build_target(native.hf_model, native.tokenizer, "smollm2", "hf", max_len=64)
    a = native.prefill(ids).logits
    b = hf.prefill(ids).logits
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    assert a[0, -1].argmax() == b[0, -1].argmax()


# -- native.linear: oneDNN's packed weights on the CPU ---------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 17])
def test_linear_equals_f_linear(rows):
    """linear() is F.linear up to float rounding, at every row count a step has, with and without a bias,
    for 2-D and 3-D inputs."""
    from harness.targets.native import linear

    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(48, 24, generator=g), torch.randn(48, generator=g)
    x = torch.randn(rows, 24, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x.view(1, rows, 24), w, b),
                                   torch.nn.functional.linear(x.view(1, rows, 24), w, b), rtol=1e-5, atol=1e-5)


def test_linear_follows_a_weight_changed_in_place():
    """The packed copy is remade when the weight changes in place (a test scaling a layer after the target
    was built, a head trained between evaluations)."""
    from harness.targets.native import linear

    w, x = torch.randn(16, 8), torch.randn(3, 8)
    with torch.inference_mode():
        linear(x, w)
    w.mul_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)


def test_linear_carries_the_gradient_while_training():
    from harness.targets.native import linear

    w = torch.randn(16, 8, requires_grad=True)
    linear(torch.randn(3, 8), w).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_native_buffers_sit_on_the_weights_device():
    """A NativeLM is built around a model already placed (on CUDA in practice) and never moved itself, so
    every buffer it makes must follow the weights (the meta device stands in for CUDA on a CPU machine)."""
    from conftest import tiny_model

    from harness.targets.native import NativeLM

    lm = NativeLM(tiny_model().to("meta"))
    assert {b.device.type for b in lm.buffers()} == {"meta"}
