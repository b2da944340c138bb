"""spec-harness: a speculative-decoding benchmark harness.

Vocabulary (used in every module, table and record):

- target: the model being accelerated; p is its next-token distribution.
- drafter: proposes draft tokens; q is its distribution (one-hot for drafters without one, e.g. ngram).
- step: one target forward that verifies a drafter's proposal (K draft tokens in a chain, or a tree).
- accepted: a draft token the target kept.
- recovered: the token sampled from the residual normalise(max(0, p - q)) after a rejection.
- bonus: the target's own token after all drafts of a step were accepted.
- emitted: tokens a step adds to the output = accepted + 1 (the recovered or the bonus token).
- tau: mean tokens emitted per target forward (bonus or recovered token included).
- mean accepted: mean accepted drafts per step (tau - 1).
- acceptance by position j (1-based), labelled everywhere:
    unconditional  = #steps with accepted >= j / #steps that drafted >= j tokens
    conditional    = #steps with accepted >= j / #steps that drafted >= j tokens and accepted >= j - 1
- ar: the no-drafting baseline (K = 0), run through the same loop on the same prompts in the same run.
- speedup: tok/s of a drafter / tok/s of ar.
"""

__version__ = "0.1.0"
