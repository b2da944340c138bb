"""Losslessness at temperature > 0 through the real decode loop (harness.engine.scheduler), not the kernels
alone: the joint distribution of the first three emitted tokens equals the target's autoregressive joint,
computed exactly from the tiny target (no sampling of `ar`), for every drafter.

Samples: N = 2048 independent prompts with the same ids and distinct prompt_ids (so distinct random streams),
decoded with max_new_tokens = 3. Token 1 comes from the prefill, tokens 2 and 3 from speculative steps.
What runs at which batch size:
  batch 4   every configuration's chi-square (and the two-turn test): one Scheduler with batch_size 4, rows
            refilled as they finish, then the batch shrinking 4 -> 3 -> 2 -> 1 for the last prompts (the test
            asserts both happened);
  batch 1   every configuration except suffix: the first 16 and the last 16 prompts (the last ones are those
            decoded while the batch of 4 shrank) decoded alone give, prompt for prompt, the tokens they gave
            in the batch of 4. Every random draw is keyed by (seed, prompt, turn, drafter) and position, so a
            prompt's output does not depend on its batch; equality is stronger than equal distributions and
            costs far less than a second chi-square. suffix is the exception: its global structure holds
            earlier prompts' outputs, so its drafts (and then its samples) depend on the order prompts finish
            in, which the batch size changes; suffix gets a second chi-square at batch 1 instead.

Chi-square: cells are the 16^3 token triples; cells with fewer than 5 expected samples are pooled, in order of
probability, into bins of at least 5. Each test also chi-squares each position's marginal (16 cells): a q
that is a little wrong everywhere (e.g. reported at the wrong temperature) moves every marginal by several
points but spreads thin over the joint's ~400 bins, which then misses it. Each test uses alpha = 1e-4 /
NUM_TESTS (Bonferroni over all chi-square tests here; the batch-1 equality tests are exact), split evenly over
its statistics (joint and marginals). "Detects a shift of d" means: moving d of probability into or out of any
one bin of the joint (the rest rescaled) gives the joint statistic alone power >= 0.5 at its share of alpha;
each test computes d from its bins and N (`min_shift`) and asserts d <= 2 percentage points, so the stated
power cannot silently erode.

The tiny target: vocabulary 16, two layers, its final norm scaled (by c * T) so that at the run's temperature
T each step spreads over all 16 tokens (after the prompt: largest probability 0.14, smallest 0.025), context
dependent; the largest cell of the three-token joint holds 0.5%. Drafters with a q of their own that a head or
model sets (model, eagle*, block) come in kinds: peaked (logits scaled up: q's top entry is 1.0 in float32, the
others ~0: a near-degenerate q), flat (logits scaled down: q near uniform; both asserted on the proposals) and,
kept from earlier rounds because each caught a bug, medium: the draft model at T = 0.2 (q's top entry about
0.5, a q that a drafter reporting q at the wrong temperature gets badly wrong) and the eagle tree at T = 1
(more rejections, so more rows take the second step where a constant verify position shows); and the block
head at T = 0.2 (q's median top entry 0.48: block drafts 2..K reporting q at T = 1 fail here, while its
peaked and flat q hardly change between temperatures); and the eagle3 chain that stops on the head's
confidence (stop_below, T = 1: rows draft 0, 1 or 2 tokens depending on their own draws, asserted), whose
ragged stopping must not bias what is kept; and the eagle3 chain drafting in bf16 beside the fp32 target
(head_dtype=bfloat16, T = 1). One-hot
drafters (ngram, suffix) and self-drafters (layerskip, selfspec) have no head kind.

Coverage (CASES): the full product drafter x T in {0.2, 1.0} x head kind, plus the five medium cases. Each run
must draft, accept and reject (asserted from its step records), so a configuration that silently never drafts
fails. The prompt repeats itself, so ngram and suffix always find a match to propose.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import tiny_model
from scipy.stats import chi2, chisquare, ncx2
from scipy.optimize import brentq
from test_eagle import random_head

from harness.drafters.block import BlockDrafter, init_block
from harness.drafters.eagle import EagleDrafter, TreeShape
from harness.drafters.heads import Frozen, config_for_target
from harness.drafters.model import ARDraftModel, layerskip
from harness.drafters.ngram import NGram
from harness.drafters.selfspec import skip_view
from harness.drafters.suffix import SuffixConfig, SuffixDrafter
from harness.engine.scheduler import Scheduler
from harness.suites import Prompt
from harness.targets import build_target

V = 16
PROMPT = [1, 2, 3, 1, 2, 3, 4, 1, 2]  # repetitive: ngram and suffix always find a match to propose
PROMPT_B = [9, 12, 7, 9, 12, 7, 0, 9, 12]  # turn 2 of the two-turn test: same length, other context
K = 2
BATCH = 4
SAMPLES = 2048
SPREAD = 0.15  # target logit scale at T = 1 (times T at temperature T): every token keeps mass
PEAKED, MEDIUM, FLAT = 400.0, 0.1, 0.05  # draft logit scales
PEAKED_SHARE = 0.5  # a peaked q's top entry is 1.0 in float32 for at least this share of the drafted tokens
FLAT_TOP = 0.3  # a flat q's top entry is below this for at least half of them (uniform: 1/16)
EAGLE_MEDIUM = 4.0  # an eagle head's medium scale: q's top entry about 0.4 to 0.9 at T = 1
BLOCK_MEDIUM = 4.0  # the block head's
TREE = TreeShape(depth=2, top_k=3, total_tokens=5)
STOP_BELOW = 0.3  # eagle3-stop: a row stops drafting once its chain's draft probability is below this
MAX_LEN = 32
TEMPERATURES = (0.2, 1.0)

HEADLESS = ("ngram", "suffix", "layerskip", "selfspec")  # one-hot q, or the target's own layers
HEADED = ("model", "eagle-chain", "eagle-tree", "eagle3-chain", "eagle3-tree", "block")  # q set by a head/model
# (drafter, head, temperature, samples): the configurations with a chi-square test at batch BATCH
CASES = ([(name, None, t, SAMPLES) for name in HEADLESS for t in TEMPERATURES]
         + [(name, head, t, SAMPLES) for name in HEADED for head in ("peaked", "flat") for t in TEMPERATURES]
         + [("model", "medium", 0.2, SAMPLES), ("eagle-tree", "medium", 1.0, SAMPLES),
            ("block", "medium", 0.2, SAMPLES), ("eagle3-stop", "medium", 1.0, SAMPLES),
            ("eagle3-bf16", "medium", 1.0, SAMPLES)])
BATCH_ONE_CHI = [("suffix", None, t, SAMPLES) for t in TEMPERATURES]  # chi-square at batch 1 as well
TWO_TURN_SAMPLES = 2048
NUM_TESTS = len(CASES) + len(BATCH_ONE_CHI) + 1  # the chi-square tests of this file and _b (two-turn included)
# The cases are split between this file and test_lossless_b.py (the batch-1 suffix and two-turn tests live
# there too), so that `make test`'s two workers (--dist loadfile) share them: one file took 20 minutes.
PART_A, PART_B = CASES[0::2], CASES[1::2]
ALPHA = 1e-4 / NUM_TESTS


def params(cases=CASES):
    """CASES as pytest params (the peaked tree case once failed here: p = 7.5e-309 before the tree rule
    summed the undrawn q mass directly)."""
    return [pytest.param(case, id=case_id(case)) for case in cases]


def case_id(case):
    name, head, t, _ = case
    return f"{name}-{head or ('onehot' if name in ('ngram', 'suffix') else 'own')}-T{t}"


# -- the target and its exact joint ---------------------------------------------------------------------------
@functools.cache
def target_at(temperature: float):
    """The tiny target for temperature T: logits scaled by SPREAD * T, so p_T = softmax(SPREAD * logits)."""
    model = tiny_model(layers=2, vocab=V, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False,
                       initializer_range=0.5)
    with torch.no_grad():
        model.model.norm.weight.mul_(SPREAD * temperature)
    return build_target(model, None, "tiny", "native", max_len=MAX_LEN), model


@torch.no_grad()
def exact_joint(model, prompt: list[int], temperature: float, n: int = 3) -> torch.Tensor:
    """The target's autoregressive joint of the first n tokens after prompt at temperature T: [V] * n, float64."""
    joint = torch.ones(())
    for i in range(n):
        grid = torch.cartesian_prod(*[torch.arange(V)] * i).reshape(-1, i) if i else torch.zeros(1, 0, dtype=torch.long)
        ids = torch.cat([torch.tensor(prompt).expand(grid.shape[0], -1), grid], 1)
        p = torch.softmax(model(ids).logits[:, -1].double() / temperature, -1)  # [V^i, V]
        joint = joint.reshape(-1, 1) * p
    return joint.reshape([V] * n)


# -- chi-square with pooled bins, and the shift it detects -----------------------------------------------------
def make_bins(prob: torch.Tensor, n: int, min_expected: float = 5.0) -> list[list[int]]:
    """Cells (flat indices) -> bins: a cell with >= min_expected expected samples is its own bin; the others
    are pooled in order of decreasing probability into bins of >= min_expected (chosen before any data)."""
    order = torch.argsort(prob, descending=True, stable=True).tolist()
    bins, pool, mass = [], [], 0.0
    for c in order:
        if prob[c] * n >= min_expected:
            bins.append([c])
            continue
        pool.append(c)
        mass += float(prob[c])
        if mass * n >= min_expected:
            bins.append(pool)
            pool, mass = [], 0.0
    if pool:
        bins[-1] = bins[-1] + pool
    return bins


def min_shift(bin_probs: list[float], n: int, alpha: float = ALPHA, power: float = 0.5) -> float:
    """The smallest d such that moving d of probability into or out of the largest bin (the others rescaled)
    is detected with the given power: noncentrality n * d^2 / (p (1 - p))."""
    df = len(bin_probs) - 1
    crit = chi2.isf(alpha, df)
    lam = brentq(lambda x: ncx2.sf(crit, df, x) - power, 1e-6, 1e5)
    p = max(bin_probs)
    return math.sqrt(lam * p * (1 - p) / n)


def pooled_pvalue(counts: torch.Tensor, prob: torch.Tensor) -> tuple[float, list[float]]:
    """(p-value, bin probabilities) of counts [C] against cell probabilities [C], cells pooled by make_bins."""
    n = float(counts.sum())
    bins = make_bins(prob, n)
    obs = [float(counts[b].sum()) for b in bins]
    exp = [float(prob[b].sum()) * n for b in bins]
    scale = n / sum(exp)  # the joint sums to 1 up to float rounding
    return chisquare(obs, [e * scale for e in exp]).pvalue, [e / n for e in exp]


def chi_square(samples: list[tuple[int, ...]], joint: torch.Tensor) -> tuple[float, float]:
    """(p-value, smallest detectable shift) of the samples (token tuples) against the exact joint [V] * m.
    One test, m + 1 statistics: the joint's chi-square and each position's marginal chi-square (a q that is
    wrong everywhere by a little moves each marginal a lot but spreads thin over the joint's ~400 bins); the
    test rejects when any of them is below ALPHA / (m + 1), so its p-value is (m + 1) * the smallest (Bonferroni
    inside the test) and its smallest detectable shift is at most the joint's at that split alpha."""
    n, m = len(samples), joint.dim()
    counts = torch.zeros([V] * m, dtype=torch.float64)
    for s in samples:
        counts[s] += 1
    pvalue, bin_probs = pooled_pvalue(counts.flatten(), joint.flatten())
    pvalues = [pvalue]
    for i in range(m):
        others = tuple(j for j in range(m) if j != i)
        pvalues.append(pooled_pvalue(counts.sum(others), joint.sum(others))[0])
    return min(1.0, (m + 1) * min(pvalues)), min_shift(bin_probs, n, ALPHA / (m + 1))


# -- drafters -------------------------------------------------------------------------------------------------
def scaled_frozen(target, scale: float) -> Frozen:
    """The target's frozen weights with the final norm scaled: the head's logits scale by `scale`."""
    fz = Frozen.of(target)
    return Frozen(embed=fz.embed, norm=fz.norm * scale, lm_head=fz.lm_head, eps=fz.eps)


def make_drafter(name: str, head: str | None, target):
    medium = EAGLE_MEDIUM if name.startswith("eagle") else BLOCK_MEDIUM if name == "block" else MEDIUM
    scale = {"peaked": PEAKED, "medium": medium, "flat": FLAT, None: 1.0}[head]
    if name == "ngram":
        return NGram()
    if name == "suffix":  # free verification: propose every tree whole (the CPU default drops weak ones)
        return SuffixDrafter(SuffixConfig(verify_overhead=0.0, verify_per_node=0.0))
    if name == "layerskip":
        return layerskip(target, 1)
    if name == "selfspec":  # skips the first layer (layerskip drops the last)
        return skip_view(target, (0,))
    if name == "model":
        draft = tiny_model(layers=1, vocab=V, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False,
                           seed=3, initializer_range=0.5)
        with torch.no_grad():
            draft.model.norm.weight.mul_(scale)
        return ARDraftModel(build_target(draft, None, "draft", "native", max_len=MAX_LEN), "model")
    if name == "block":  # its own vocabulary (V - 2 tokens) and final norm, like eagle3
        frozen = Frozen.of(target)
        hd = init_block(config_for_target(target, "block", V - 2), frozen, 6)
        with torch.no_grad():
            for p in hd.parameters():
                if p.dim() == 2:
                    p.mul_(4.0)  # (init's small weights give the mask rows too little to say)
            hd.norm.weight.mul_(scale)
        return BlockDrafter(hd.eval().requires_grad_(False), frozen, "block", MAX_LEN, target.device)
    variant, shape = name.split("-")
    tree = TREE if shape == "tree" else None
    stop = STOP_BELOW if shape == "stop" else 0.0
    if variant == "eagle3":  # its own (restricted) vocabulary and final norm: q is 0 outside it
        hd, frozen = random_head(target, "eagle3", draft_vocab=V - 2, seed=5)
        with torch.no_grad():
            hd.norm.weight.mul_(scale)
    else:
        hd, _ = random_head(target, "eagle", seed=4)
        frozen = scaled_frozen(target, scale)
    if shape == "bf16":  # head_dtype=bfloat16: the head drafts in bf16, the fp32 target verifies
        hd, frozen = hd.to(torch.bfloat16), frozen.to(torch.bfloat16)
    return EagleDrafter(hd, frozen, variant, tree, MAX_LEN, target.device, stop)


def watch_q(drafter) -> list[float]:
    """Records the largest entry of q of every drafted token the proposals carry (rows of zeros, the padding
    of trees and of parked rows, left out; proposals without q record nothing)."""
    tops, propose = [], drafter.propose

    def recording(ctx):
        prop = propose(ctx)
        if prop.q is not None:
            top = prop.q.max(-1).values.flatten()
            tops.extend(top[top > 0].tolist())
        return prop
    drafter.propose = recording
    return tops


class Run:
    """One Scheduler run: outputs per prompt, every step record, the batch sizes seen when prompts finished,
    and the q extremes of the proposals."""

    def __init__(self, out, steps, sizes, q_tops):
        self.out, self.steps, self.sizes, self.q_tops = out, steps, sizes, q_tops


def decode_many(target, drafter, n, batch_size: int, temperature: float, turns=("",), max_new: int = 3,
                encode=None, seed: int = 0) -> Run:
    """The run for prompts r0 .. r{n-1} (n an int) or r{i} for i in n (a list): the same ids, each prompt its
    own random streams."""
    which = range(n) if isinstance(n, int) else n
    got, steps, sizes = {}, [], []
    q_tops = watch_q(drafter)

    def finish(p, fields, st):
        got.setdefault(p.prompt_id, fields["output_ids"])
        steps.extend(st)
        sizes.append(sum(r is not None for r in sched.rows))

    sched = Scheduler(target, drafter, name=drafter.name, batch_size=batch_size, max_new_tokens=max_new, k=K,
                      temperature=temperature, seed=seed, eos_ids=set(), catch=False,
                      encode=encode or (lambda _seq: list(PROMPT)), on_finish=finish)
    sched.run([Prompt(f"r{i}", "c", "s", tuple(turns)) for i in which])
    assert len(got) == len(which)
    return Run(got, steps, sizes, q_tops)


@functools.cache
def batched_run(case, batch_size: int = BATCH) -> Run:
    name, head, t, n = case
    target, _ = target_at(t)
    return decode_many(target, make_drafter(name, head, target), n, batch_size, t)


def check_exercised(case, run: Run, batch_size: int) -> None:
    """The run drafted, accepted and rejected; the batch was full and then shrank; the head kind holds."""
    name, head, _, _ = case
    drafted = [s for s in run.steps if s["depth"] > 0]
    rejected = [s for s in drafted if not s["cut"] and s["accepted"] < s["depth"]]  # a recovered token
    assert drafted and rejected and any(s["accepted"] > 0 for s in drafted), \
        f"{case_id(case)}: {len(drafted)} drafting steps, {len(rejected)} with a rejection"
    if name.endswith("-stop"):  # the stopping rule acted: steps drafted none, some and all K tokens
        assert {s["depth"] for s in run.steps} == set(range(K + 1)), sorted({s["depth"] for s in run.steps})
    if batch_size > 1:
        assert max(run.sizes) == batch_size and min(run.sizes) < batch_size, sorted(set(run.sizes))
    if head is not None:
        tops = torch.tensor(run.q_tops)
        share = float((tops == 1.0).double().mean())
        if head == "peaked":
            assert share >= PEAKED_SHARE, f"q's top entry is 1.0 in float32 for only {100 * share:.0f}% of drafts"
        if head == "flat":
            assert float(tops.median()) < FLAT_TOP, f"the flat q's median top entry is {float(tops.median()):.2f}"


# -- the tests ------------------------------------------------------------------------------------------------
def first_three_test(case, batch_size):
    name, head, t, n = case
    _, model = target_at(t)
    run = batched_run(case, batch_size)
    check_exercised(case, run, batch_size)
    samples = [tuple(o[0][:3]) for o in run.out.values()]
    assert all(len(s) == 3 for s in samples)
    pvalue, shift = chi_square(samples, exact_joint(model, PROMPT, t))
    assert shift <= 0.02, f"the test detects only shifts of {100 * shift:.2f} pp: add samples"
    assert pvalue > ALPHA, f"{case_id(case)}: chi-square p = {pvalue:.2e} (shift detectable {100 * shift:.2f} pp)"


@pytest.mark.parametrize("case", params(PART_A))
def test_first_three_tokens_follow_the_target(case):
    """Batch 4 (rows refilled as they finish, then the batch shrinks), 2048 samples: the first three tokens'
    joint equals the target's at T. Smallest detectable shift, one bin, power 0.5, alpha 1e-4/39/4: 1.82
    percentage points (the target's p_T is the same at both temperatures; computed and asserted <= 2 pp)."""
    first_three_test(case, BATCH)


def batch_one_test(case):
    """Batch 1 (one row, the same scheduler and step): the first 16 and the last 16 prompts (those decoded
    while the batch of 4 filled up and refilled its rows, and while it shrank) give, prompt for prompt,
    the tokens they gave in the batch of 4, so the batch-1 loop draws from the distribution tested above.
    A stream that depends on the row or the batch (e.g. a constant or batch-relative position, or keys
    shared across rows) breaks the equality at once."""
    name, head, t, n = case
    target, _ = target_at(t)
    batched = batched_run(case).out
    ids = list(range(16)) + list(range(n - 16, n))
    alone = decode_many(target, make_drafter(name, head, target), ids, 1, t)
    assert alone.steps and any(s["depth"] > 0 for s in alone.steps)
    assert alone.out == {pid: batched[pid] for pid in alone.out}


@pytest.mark.parametrize("case", params([c for c in PART_A if c[0] != "suffix"]))
def test_batch_one_equals_the_batched_run(case):
    batch_one_test(case)
