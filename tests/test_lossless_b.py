"""The other half of test_lossless.py's chi-square cases (PART_B), with the suffix batch-1 and the two-turn
tests: split from it only so that `make test`'s two workers (--dist loadfile) share the work. The machinery,
the cases and alpha (over all of them) are test_lossless's; read its docstring for what each test checks."""

import pytest

from test_lossless import (BATCH, BATCH_ONE_CHI, PART_B, PROMPT, PROMPT_B, TWO_TURN_SAMPLES, ALPHA, batch_one_test,
                           chi_square, decode_many, exact_joint, first_three_test, make_drafter, params, target_at)


@pytest.mark.parametrize("case", params(PART_B))
def test_first_three_tokens_follow_the_target(case):
    """As test_lossless's test of the same name, on PART_B."""
    first_three_test(case, BATCH)


@pytest.mark.parametrize("case", params([c for c in PART_B if c[0] != "suffix"]))
def test_batch_one_equals_the_batched_run(case):
    """As test_lossless's test of the same name (batch_one_test's docstring), on PART_B."""
    batch_one_test(case)


@pytest.mark.parametrize("case", params(BATCH_ONE_CHI))
def test_suffix_at_batch_one_follows_the_target(case):
    """suffix at batch 1, 2048 samples, the same chi-square (its drafts depend on the order prompts finish
    in, so batch-1 outputs are not the batch-4 ones prompt for prompt)."""
    first_three_test(case, 1)


def encode_two_turns(seq) -> list[int]:
    """Turn 1 reads PROMPT, turn 2 PROMPT_B: the same length, so turn 2's positions are turn 1's and only
    the turn in the row's keys tells their random streams apart."""
    return list(PROMPT if len(seq.messages) == 1 else PROMPT_B)


def test_two_turns_follow_the_target():
    """Two turns of two tokens each (one prefill token and one step token per turn), model drafter with a
    peaked q at T = 1, 2048 prompts at batch 4: the joint of the four tokens equals
    p(a1, a2 | PROMPT) * p(b1, b2 | PROMPT_B). Turn 2 does not read turn 1's answer (encode_two_turns), so
    the exact joint is a product; a turn that reuses the previous turn's uniforms correlates them.
    Smallest detectable shift, one bin, power 0.5, alpha 1e-4/39/5: 1.59 percentage points (computed and
    asserted <= 2 pp)."""
    t, n = 1.0, TWO_TURN_SAMPLES
    target, model = target_at(t)
    run = decode_many(target, make_drafter("model", "peaked", target), n, BATCH, t, turns=("a", "b"), max_new=2,
                      encode=encode_two_turns)
    assert {s["turn"] for s in run.steps if s["depth"] > 0} == {0, 1}
    samples = [tuple(o[0] + o[1]) for o in run.out.values()]
    assert all(len(s) == 4 for s in samples)
    joint = exact_joint(model, PROMPT, t, 2)[:, :, None, None] * exact_joint(model, PROMPT_B, t, 2)[None, None]
    pvalue, shift = chi_square(samples, joint)
    assert shift <= 0.02, f"the test detects only shifts of {100 * shift:.2f} pp: add samples"
    assert pvalue > ALPHA, f"two turns: chi-square p = {pvalue:.2e} (shift detectable {100 * shift:.2f} pp)"
