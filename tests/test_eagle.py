"""EAGLE drafters: lossless at temperature 0 (chains and trees, both backends), drafting equals the training
unroll, tree invariants, head folders (round trip, refusals), and the shipped SmolLM2 head (slow)."""

import pytest
import torch
from conftest import tiny_model

from harness.config import RunConfig
from harness.engine.scheduler import decode
from harness.drafters.ar import AR
from harness.drafters.eagle import EagleDrafter, TreeShape, build_eagle, tree_shape
from harness.errors import UserError
from harness.drafters.heads import Frozen, config_for_target, init_head, load_head, save_head
from harness.targets import build_target
from harness.training.train_head import Unrolled

CHAIN, TREE = None, TreeShape(depth=4, top_k=3, total_tokens=9)
PROMPT = list(range(40, 64))


def one_layer_model(attn_scale: float, **kw):
    """A one-layer tiny Llama whose attention output is scaled by attn_scale (0: a bigram model)."""
    model = tiny_model(layers=1, **kw)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(attn_scale)
    return model


def random_head(target, variant, draft_vocab=0, seed=1, scale=1.0):
    frozen = Frozen.of(target)
    head = init_head(config_for_target(target, variant, draft_vocab), frozen, seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return head.eval().requires_grad_(False), frozen


def oracle_head(target, variant, model):
    """For a one-layer target: fc passes the token embedding through, the MLP is the target's, the head's
    attention is left small and random. Exact on a bigram target (attention output zeroed there too).
    eagle only: an eagle3 head sees the next token's embedding through its attention alone."""
    assert variant == "eagle"
    head, frozen = random_head(target, variant)
    layer = model.model.layers[0]
    H = target.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, :H] = torch.eye(H)
        head.fc.bias.zero_()
        head.layer.ln2.copy_(layer.post_attention_layernorm.weight)
        head.layer.gate.weight.copy_(layer.mlp.gate_proj.weight)
        head.layer.up.weight.copy_(layer.mlp.up_proj.weight)
        head.layer.down.weight.copy_(layer.mlp.down_proj.weight)
    return head, frozen


def run(target, drafter, n=40, k=4, temperature=0.0):
    return decode(target, drafter, PROMPT, max_new_tokens=n, k=k, temperature=temperature, seed=0, eos_ids=set())


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("variant,head_kind", [("eagle", "random"), ("eagle", "oracle"), ("eagle3", "random")])
def test_equals_ar_at_temperature_zero(backend, variant, head_kind):
    model = tiny_model() if head_kind == "random" else one_layer_model(0.05)
    target = build_target(model, None, "tiny", backend, max_len=256)
    ref = run(target, AR()).new_ids
    if head_kind == "random":
        head, frozen = random_head(target, variant, draft_vocab=100 if variant == "eagle3" else 0)
    else:
        head, frozen = oracle_head(target, variant, model)
    accepted = 0
    for tree in (CHAIN, TREE):
        out = run(target, EagleDrafter(head, frozen, variant, tree, 256, target.device))
        assert out.new_ids == ref, (variant, tree)
        accepted += sum(s["accepted"] for s in out.steps)
    if head_kind == "oracle":
        assert accepted > 20  # the near-exact head gets most drafts accepted: multi-token commits are exercised


class Recording(EagleDrafter):
    def propose(self, ctx):
        ctx.want_q = True  # q is what these tests compare (a greedy run without a meter would not need it)
        prop = super().propose(ctx)
        self.log.append((list(ctx.history[0]), prop))
        return prop


def reference_q(target, head, frozen, history, path, temperature=0.0):
    """The head's next-token distribution after drafting `path` from committed `history`, computed from
    scratch by the training unroll over the target's features of the committed tokens."""
    P = len(history) - 1
    target.reset(1)
    hid = target.forward(torch.tensor([history[:-1]]), hidden_layers=tuple(head.cfg.layers)).hidden
    S = len(path) + 1
    feats = torch.zeros(1, P, len(head.cfg.layers), target.hidden_size)
    for i, layer in enumerate(head.cfg.layers):
        feats[0, :, i] = hid[layer][0]
    ids = torch.tensor([history + path + [0] * (S + 1)])[:, :P + S + 1]
    model = Unrolled(head, frozen, S, 1.0).eval()
    zeros = torch.zeros(1, P, 32, dtype=torch.long)
    answer = torch.ones(1, P + S + 1, dtype=torch.bool)
    _, st = model(ids, feats, zeros, zeros.float(), torch.tensor([P]), answer, steps=S)
    out = st["outputs"][-1][0, P - 1]
    return torch.softmax(head.to_target_vocab(head.logits(out, frozen)).float() / (temperature or 1.0), -1)


@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
def test_drafts_equal_training_unroll(variant):
    """Chains and trees: every q the drafter proposes (after several committed steps, through its own cache)
    equals the training unroll's, recomputed from scratch."""
    model = one_layer_model(0.3)
    target = build_target(model, None, "tiny", "native", max_len=256)
    if variant == "eagle":
        head, frozen = oracle_head(target, variant, model)
        with torch.no_grad():
            head.layer.wo.weight.normal_(std=0.3)  # make the head's attention (its cache) matter
    else:
        head, frozen = random_head(target, variant, draft_vocab=120, scale=8.0)
    for tree, temperature in ((CHAIN, 0.0), (TREE, 0.0), (CHAIN, 0.7), (TREE, 0.7)):
        drafter = Recording(head, frozen, variant, tree, 256, target.device)
        drafter.log = []
        run(target, drafter, n=24, k=3, temperature=temperature)
        for history, prop in drafter.log[1::3]:
            if tree is None:
                for j in range(prop.tokens.shape[1]):
                    ref = reference_q(target, head, frozen, history, prop.tokens[0, :j].tolist(), temperature)
                    torch.testing.assert_close(prop.q[0, j], ref, atol=2e-5, rtol=0)
                continue
            par, tok = prop.parents[0].tolist(), prop.tokens[0].tolist()
            for n in range(len(par)):
                if n and prop.q[0, n].sum() == 0:
                    continue  # a leaf: no children drawn
                path, m = [], n
                while m > 0:
                    path.insert(0, tok[m])
                    m = par[m]
                ref = reference_q(target, head, frozen, history, path, temperature)
                torch.testing.assert_close(prop.q[0, n], ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("tree", [CHAIN, TreeShape(depth=3, top_k=3, total_tokens=7)], ids=["chain", "tree"])
def test_sampling_keeps_the_target_distribution(tree):
    """Temperature 0.7: the first three tokens over 600 seeds follow the target's joint distribution
    (chi-square), with a head good enough that multi-token acceptance and rejections both occur."""
    from scipy.stats import chisquare

    V, T, n = 12, 0.7, 600
    model = one_layer_model(0.05, vocab=V, eos_token_id=None, bos_token_id=None)
    target = build_target(model, None, "tiny", "native", max_len=64)
    head, frozen = oracle_head(target, "eagle", model)
    prompt = [1, 5, 7, 2, 3]
    with torch.no_grad():  # exact joint p(t1) p(t2 | t1) p(t3 | t1, t2) at temperature T
        grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V*V, 2]
        ids = torch.cat([torch.tensor(prompt).expand(V * V, -1), grid], 1)
        p = torch.softmax(model(ids).logits.double() / T, -1)  # [V*V, 7, V]
        joint = (p[:, 4].gather(1, grid[:, :1]) * p[:, 5].gather(1, grid[:, 1:]))[:, :, None] * p[:, 6][:, None]
    counts = torch.zeros(V ** 3)
    accepted = 0
    for seed in range(n):
        out = decode(target, EagleDrafter(head, frozen, "eagle", tree, 64, target.device), prompt,
                     max_new_tokens=3, k=2, temperature=T, seed=seed, eos_ids=set())
        t1, t2, t3 = out.new_ids[:3]
        counts[(t1 * V + t2) * V + t3] += 1
        accepted += sum(s["accepted"] for s in out.steps)
    assert 0.2 * n < accepted < 2 * n  # drafts are both accepted and rejected
    expected = joint.flatten().float() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


@pytest.mark.parametrize("temperature", [0.0, 0.8, 0.01])
def test_tree_builder_invariants(temperature):
    """At T = 0.01 the head's q has few tokens with q > 0 (float32 underflow): nodes then get fewer
    children and the trees are smaller than total_tokens + 1, with padding at the end."""
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    head, frozen = random_head(target, "eagle", scale=20.0)  # peaked q: uneven trees
    smaller = 0
    for shape in (TreeShape(4, 3, 10), TreeShape(3, 4, 20), TreeShape(5, 2, 9), TreeShape(1, 5, 3)):
        drafter = Recording(head, frozen, "eagle", shape, 256, target.device)
        drafter.log = []
        run(target, drafter, n=12, temperature=temperature)
        for _, prop in drafter.log:
            par, dep, tok = prop.parents[0].tolist(), prop.depth[0].tolist(), prop.tokens[0].tolist()
            nn = int(prop.num_nodes[0])
            assert len(par) == shape.total_tokens + 1 >= nn >= 2
            smaller += nn < len(par)
            assert par[0] == -1 and dep[0] == 0
            assert par[nn:] == [-1] * (len(par) - nn) and bool((prop.q[0, nn:] == 0).all())  # padding
            cum = [0.0] * nn
            for n in range(1, nn):
                assert 0 <= par[n] < n  # every kept node's parent is kept and comes first
                assert dep[n] == dep[par[n]] + 1 <= shape.depth
                assert prop.q[0, par[n], tok[n]] > 0  # never a child the drafter could not have drawn
                cum[n] = cum[par[n]] + float(torch.log(prop.q[0, par[n], tok[n]]))
                assert cum[n] <= cum[par[n]] + 1e-6
            for n in range(nn):
                kids = [tok[c] for c in range(1, nn) if par[c] == n]
                assert len(kids) == len(set(kids)) <= shape.top_k
                if kids:
                    assert torch.isclose(prop.q[0, n].sum(), torch.tensor(1.0))
    if temperature == 0.01:
        assert smaller > 0  # the dropping path was exercised


def test_tree_keeps_the_best_nodes():
    """Greedy trees keep the total_tokens nodes of highest cumulative draft log-probability."""
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    head, frozen = random_head(target, "eagle", scale=20.0)
    shape = TreeShape(3, 3, 5)
    drafter = Recording(head, frozen, "eagle", shape, 256, target.device)
    drafter.log = []
    run(target, drafter, n=8)
    for _, prop in drafter.log:
        par, tok = prop.parents[0].tolist(), prop.tokens[0].tolist()
        cum = [0.0] * len(par)
        for n in range(1, len(par)):
            cum[n] = cum[par[n]] + float(torch.log(prop.q[0, par[n], tok[n]]))
        # any child of a kept expanded node that was left out scores no higher than the worst kept node
        worst = min(cum[1:])
        for n in range(len(par)):
            if prop.q[0, n].sum() == 0:
                continue
            kept = {tok[c] for c in range(1, len(par)) if par[c] == n}
            top = prop.q[0, n].topk(shape.top_k)
            for v, i in zip(top.values.tolist(), top.indices.tolist()):
                if i not in kept:  # drafted, then left out by the rerank
                    assert cum[n] + float(torch.log(torch.tensor(v))) <= worst + 1e-6


def test_head_folder_round_trip(tmp_path):
    target = build_target(one_layer_model(0.3), None, "tiny", "native", max_len=256)
    head, frozen = random_head(target, "eagle3", draft_vocab=80, scale=5.0)
    save_head(head, tmp_path / "fp32", dtype=torch.float32)
    loaded = load_head(tmp_path / "fp32", target, "eagle3")
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    a = run(target, EagleDrafter(head, frozen, "eagle3", TREE, 256, target.device))
    b = run(target, EagleDrafter(loaded, frozen, "eagle3", TREE, 256, target.device))
    assert a.new_ids == b.new_ids and [s["accepted"] for s in a.steps] == [s["accepted"] for s in b.steps]
    save_head(head, tmp_path / "bf16")  # the shipped format
    again = load_head(tmp_path / "bf16", target, "eagle3")
    for k, v in head.state_dict().items():
        assert torch.equal(again.state_dict()[k], v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v)


def test_head_for_another_target_is_refused(tmp_path):
    target = build_target(tiny_model(), None, "tiny", "native", max_len=64)
    head, _ = random_head(target, "eagle")
    save_head(head, tmp_path / "h")
    cases = {
        "hidden_size": tiny_model(hidden_size=32),
        "vocab_size": tiny_model(vocab=300),
        "embedding fingerprint": tiny_model(seed=5),
    }
    for field, other in cases.items():
        with pytest.raises(UserError, match=field) as err:
            load_head(tmp_path / "h", build_target(other, None, "other", "native", max_len=64), "eagle")
        assert "train-head" in str(err.value)
    with pytest.raises(UserError, match="'eagle' head, not 'eagle3'"):
        load_head(tmp_path / "h", target, "eagle3")
    with pytest.raises(UserError, match="not a head folder"):
        load_head(tmp_path, target, "eagle")


def test_build_eagle_finds_heads_and_reads_tree_flags(tmp_path):
    target = build_target(tiny_model(), None, "tiny", "native", max_len=64)
    with pytest.raises(UserError, match="train-head --target"):
        build_eagle("eagle", target, RunConfig(target="tiny"))
    head, _ = random_head(target, "eagle")
    save_head(head, tmp_path / "h")
    drafter = build_eagle("eagle", target, RunConfig(target="tiny", head=str(tmp_path / "h"), total_tokens=0))
    assert drafter.tree is None and drafter.hidden_layers == (-1,)
    assert build_eagle("eagle", target, RunConfig(head=str(tmp_path / "h"))).tree is None  # CPU: chains
    assert build_eagle("eagle", target, RunConfig(head=str(tmp_path / "h"), depth=3)).tree == TreeShape(3, 4, 10)
    assert tree_shape(RunConfig(), torch.device("cuda")) is not None
    assert tree_shape(RunConfig(depth=3, top_k=2, total_tokens=6), torch.device("cpu")) == TreeShape(3, 2, 6)
    with pytest.raises(UserError, match="exceeds"):
        tree_shape(RunConfig(depth=2, top_k=2, total_tokens=7), torch.device("cpu"))


@pytest.mark.slow
def test_shipped_smollm2_head_is_lossless_and_accepts():
    from harness.drafters import build_drafter
    from harness.targets.chat import eos_ids, prompt_ids
    from harness.suites import load_suite
    from harness.targets import load_target

    target = load_target("smollm2-135m", backend="native", device="cpu", dtype="float32", max_len=512)
    eos = eos_ids(target)
    prompts = [prompt_ids(target.tokenizer, [{"role": "user", "content": p.turns[0]}])
               for p in load_suite("mini", per_category=1)[:2]]
    accepted = steps = 0
    for cfg in (RunConfig(), RunConfig(depth=5, top_k=4, total_tokens=10)):  # a chain, a tree
        drafter = build_drafter("eagle", target, cfg)
        for ids in prompts:
            kw = dict(max_new_tokens=32, k=4, temperature=0.0, seed=0, eos_ids=eos)
            ref = decode(target, AR(), ids, **kw).new_ids
            out = decode(target, drafter, ids, **kw)
            assert out.new_ids == ref
            accepted += sum(s["accepted"] for s in out.steps)
            steps += len(out.steps)
    assert accepted / steps > 0.15  # mean accepted drafts per step: clearly above zero (about 0.3-0.5 measured)


@pytest.mark.slow
def test_shipped_smollm2_head_batched_equals_ar():
    """The shipped head, chain and tree, at batch 4 with continuous batching (6 prompts of different
    lengths, one of two turns) equals ar at batch 1, token for token (fp32)."""
    from harness.drafters import build_drafter
    from harness.engine.scheduler import Scheduler
    from harness.suites import Prompt, load_suite
    from harness.targets import load_target
    from harness.targets.chat import eos_ids

    target = load_target("smollm2-135m", backend="native", device="cpu", dtype="float32", max_len=768)
    eos = eos_ids(target)
    prompts = load_suite("mini", per_category=2)[:5]
    prompts.append(Prompt("two-turn", "chat", "t", ("Name a colour.", "And another one?")))

    def outputs(drafter, name, b):
        got = {}
        Scheduler(target, drafter, name=name, batch_size=b, max_new_tokens=24, k=4, temperature=0.0, seed=0,
                  eos_ids=eos, catch=False, on_finish=lambda p, f, s: got.setdefault(p.prompt_id, f["output_ids"])
                  ).run(prompts)
        return got

    ref = outputs(AR(), "ar", 1)
    for cfg in (RunConfig(), RunConfig(depth=4, top_k=3, total_tokens=8)):
        assert outputs(build_drafter("eagle", target, cfg), "eagle", 4) == ref


@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
def test_a_bf16_head_drafts_beside_an_fp32_target(tmp_path, variant):
    """head_dtype=bfloat16 (a CPU option): the head's weights, its cache and the embedding it reads are bf16
    while the fp32 target verifies. Greedy output equals ar's, chains and trees, and the eagle oracle's
    drafts are still accepted (a head fed the wrong dtype or the wrong features would not be)."""
    model = one_layer_model(0.05)
    target = build_target(model, None, "tiny", "native", max_len=256)
    head, _ = oracle_head(target, "eagle", model) if variant == "eagle" else random_head(target, "eagle3", 100)
    save_head(head, tmp_path / "h", dtype=torch.float32)
    ref = run(target, AR()).new_ids
    accepted = {}
    for head_dtype in ("float32", "bfloat16"):
        for shape in (dict(total_tokens=0), dict(depth=4, top_k=3, total_tokens=9)):
            drafter = build_eagle(variant, target, RunConfig(head=str(tmp_path / "h"), head_dtype=head_dtype, **shape))
            want = getattr(torch, head_dtype)
            assert drafter.head.fc.weight.dtype == want
            assert drafter.frozen.embed.dtype == want and target.dtype == torch.float32
            out = run(target, drafter)
            assert out.new_ids == ref, (head_dtype, shape)
            assert drafter.k_cache.dtype == want
            accepted[head_dtype, len(shape)] = sum(s["accepted"] for s in out.steps)
    if variant == "eagle":  # the oracle drafts well in either dtype
        assert min(accepted.values()) > 10, accepted
    with pytest.raises(UserError, match="head_dtype must be"):
        build_eagle(variant, target, RunConfig(head=str(tmp_path / "h"), head_dtype="float16"))


def test_head_dtype_is_an_eagle_setting():
    from harness.drafters import parse_variant

    assert parse_variant("eagle3:k=2:head_dtype=bfloat16") == ("eagle3", {"k": 2, "head_dtype": "bfloat16"})
    with pytest.raises(UserError, match="head_dtype is for eagle"):
        parse_variant("ngram:head_dtype=bfloat16")
