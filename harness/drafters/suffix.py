"""`suffix`: model-free suffix decoding (SuffixDecoding, Oliaro et al., arXiv 2411.04975).

Two kinds of suffix structure propose continuations:
  local   one per row: the prompt and this conversation's output so far, updated as tokens are committed;
  global  one per drafter object: every earlier output of the run (each finished turn is added when its
          row starts something new), plus an optional corpus file (--suffix-corpus); never reset in a run.

The structure is a suffix trie cut at depth D (`SuffixTrie`): every substring of length <= D of the indexed
sequences is a path from the root, and a node counts its substring's occurrences. Appending a token
touches at most D nodes (the suffixes that end at the previous token), so updates are incremental and
cheap in pure Python for prompts of a few hundred tokens.

Each step and row: the pattern is the longest suffix of the row's context (at most `max_match` tokens)
that occurred earlier with a continuation. Below the pattern's node, a child's probability given its
parent is count(child) / sum of the parent's children's counts (the counts-based estimate of SuffixDecoding);
a node's score is the product along its path, the chance that the whole path is accepted. Counts over a
short match are overconfident (one earlier "the" says little about what follows this "the"), so each
factor is also weighted by m / (m + prior), m = the tokens of context it rests on. Replaying SmolLM2's
greedy answers to prompts no bench run uses, this is close to the measured acceptance of the best child:
about 0.2 for a one-token local match, 0.5-0.6 for two, 0.7-0.9 from four on. Global matches of one or
two tokens are right far less often (5-30%, where counts and prior 2 say 20-45%), so the global structure
has its own, larger prior (global_prior).

Tree size: nodes are taken best-first (every kept node's ancestors are kept), at most
min(max_nodes, ceil(alpha * match length)) of them (SuffixDecoding's adaptive max_spec) and none scoring
below min_prob. Of that best-first order, the tree proposed is the prefix of n nodes that maximises the
expected tokens per unit of verify cost, (1 + S_n) / c(n), S_n = the sum of its scores (expected accepted
drafts) and c(n) = 1 + verify_overhead + verify_per_node * n the cost of verifying 1 + n tokens relative
to a one-token forward; nothing is proposed when no prefix beats 1 (a plain forward). On this project's
CPU, with the native backend's oneDNN linear layers, a verify of 2 / 6 / 16 tokens costs 1.08 / 1.27 /
1.86 one-token forwards (results/verify-width-cpu/, one thread: the defaults 0.05 + 0.055 n fit it), so
weak guesses are dropped and a confident path is drafted deep; on a GPU both costs are near 0 and every
tree is proposed whole. (Before the oneDNN layers, a verify of 2-11 tokens cost 1.4-2.1 forwards.)
The local and the global structure each propose their best prefix; the one with the higher gain is used.
When every row's tree is a single path (most steps: a copied span), the step is proposed as a ragged
chain instead (num_draft, like ngram): the same tokens and the same decision, without the tree mask, the
tree verifier and the KV compaction, which on a CPU cost about 0.5 ms a step (results/smollm2-mini-cpu:
suffix and ngram accepted the same drafts on summarization, and suffix lost on those host costs).

The global structure can be warmed with a corpus of the target's own earlier answers (--suffix-corpus;
SuffixDecoding's setting: a deployment's global tree holds its earlier outputs). The shipped
harness/suites/suffix_corpus_smollm2.jsonl holds SmolLM2-135M-Instruct's greedy answers to mini prompts
3-10 of each category and to the calibration prompts, none of them a prompt the bench presets measure.

q is one-hot (has_q = False): the tree is a function of the committed context and earlier outputs, never
of this step's randomness, and siblings are distinct tokens, so the multi-draft verifier with
draft_probs = None (one-hot q', residual p minus the rejected siblings) keeps the target's distribution.
"""

from __future__ import annotations

from collections import Counter

import heapq
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.drafters.base import Committed, DraftContext, Drafter
from harness.errors import UserError
from harness.types import Proposal


@dataclass
class SuffixConfig:
    """Defaults chosen by replaying ar's greedy SmolLM2-135M answers (64 tokens) to prompts that no bench run
    uses (mini prompts 3-6 of each category; corpus: prompts 7-10 and the calibration suite) through the
    drafter, with verify forwards costing what they measured on this project's CPU
    (benchmarks/tune_suffix.py); the verify cost refitted after the oneDNN layers (module docstring)."""

    max_match: int = 12  # longest context suffix matched (tokens)
    max_depth: int = 12  # longest drafted path below the match
    max_nodes: int = 10  # draft nodes per step at most (the root excluded)
    alpha: float = 4.0  # node budget per matched token (SuffixDecoding's max_spec = alpha * match length)
    min_prob: float = 0.1  # drop nodes whose path score is below this
    prior: float = 2.0  # match-length confidence m / (m + prior) on each step's counts (0: pure counts)
    global_prior: float = 4.0  # the same for the global structure (its short matches are right less often)
    verify_overhead: float = 0.05  # verifying 1 + n tokens costs 1 + verify_overhead + verify_per_node * n
    verify_per_node: float = 0.055  # ... one-token forwards (CPU; set both to 0 on a GPU: whole trees)


class SuffixTrie:
    """Suffix trie of one or more token sequences, cut at depth `max_depth`, with occurrence counts.

    Node 0 is the root. children[n]: token -> child node (None for a node never extended); count[n]:
    occurrences of node n's substring; depth[n]: its length."""

    def __init__(self, max_depth: int):
        if max_depth < 2:
            raise ValueError("a suffix trie needs max_depth >= 2")
        self.max_depth = max_depth
        self.children: list[dict[int, int] | None] = [None]
        self.count = [0]
        self.depth = [0]
        self.active: list[int] = []  # nodes of the suffixes ending at the last token, shorter than max_depth
        self.size = 0  # tokens indexed

    def start_sequence(self) -> None:
        """The next token begins a new sequence: no substring spans the boundary."""
        self.active = []

    def extend(self, tokens) -> None:
        D = self.max_depth
        children, count, depth = self.children, self.count, self.depth
        for t in tokens:
            nxt = []
            for a in [0] + self.active:
                kids = children[a]
                if kids is None:
                    kids = children[a] = {}
                c = kids.get(t)
                if c is None:
                    c = kids[t] = len(count)
                    children.append(None)
                    count.append(0)
                    depth.append(depth[a] + 1)
                count[c] += 1
                if depth[c] < D:
                    nxt.append(c)
            self.active = nxt
            self.size += 1

    def find(self, pattern) -> int | None:
        """The node of `pattern`, or None when it never occurred."""
        n = 0
        for t in pattern:
            kids = self.children[n]
            n = kids.get(t) if kids else None
            if n is None:
                return None
        return n

    def match(self, context: list[int], max_match: int) -> tuple[int, int]:
        """(node, length) of the longest suffix of `context` (<= max_match tokens) that occurred with a
        continuation; (-1, 0) when none did."""
        longest = min(max_match, len(context), self.max_depth - 1)
        for m in range(longest, 0, -1):
            n = self.find(context[len(context) - m:])
            if n is not None and self.children[n]:
                return n, m
        return -1, 0

    def expand(self, node: int, budget: int, min_prob: float, max_depth: int, match_len: int = 1,
               prior: float = 0.0) -> tuple[list, list, list, list]:
        """Best-first continuation tree below `node` (the match of `match_len` tokens): (tokens, parents,
        depths, scores) of at most `budget` nodes, parents as indices into this list (-1 = the root), in
        the order they were taken (a parent before its children). A child's score is its parent's times
        count(child) / (sum of the siblings' counts) times m / (m + prior), m = match_len + the parent's
        depth: the context the counts rest on."""
        tokens, parents, depths, scores = [], [], [], []
        heap = []  # (-score, tie, trie node, tree parent, depth)
        tie = 0

        def push(trie_node: int, tree_parent: int, d: int, score: float):
            nonlocal tie
            kids = self.children[trie_node]
            if not kids or d >= max_depth:
                return
            total = sum(self.count[c] for c in kids.values())
            m = match_len + d
            conf = m / (m + prior)
            for tok, c in kids.items():
                s = score * conf * self.count[c] / total
                if s >= min_prob:
                    heapq.heappush(heap, (-s, tie, c, tree_parent, d + 1, tok))
                    tie += 1

        push(node, -1, 0, 1.0)
        while heap and len(tokens) < budget:
            neg, _, c, par, d, tok = heapq.heappop(heap)
            tokens.append(tok)
            parents.append(par)
            depths.append(d)
            scores.append(-neg)
            push(c, len(tokens) - 1, d, -neg)
        return tokens, parents, depths, scores


@dataclass
class _Row:
    trie: SuffixTrie
    tokens: list[int]  # what the trie indexed (prompt + output so far)
    prompt_len: int  # tokens[:prompt_len] is the prompt; the rest is this turn's output


class SuffixDrafter(Drafter):
    name = "suffix"
    has_q = False
    tree = "suffix"  # drafts trees (harness.calibrate.is_tree_drafter: --k auto refuses it)

    def __init__(self, cfg: SuffixConfig | None = None, corpus: list[list[int]] | None = None):
        self.cfg = cfg or SuffixConfig()
        c = self.cfg
        if c.max_match < 1 or c.max_depth < 1 or c.max_nodes < 1 or c.alpha <= 0 or not 0 <= c.min_prob < 1 \
                or c.prior < 0 or c.global_prior < 0 or c.verify_overhead < 0 or c.verify_per_node < 0:
            raise UserError("suffix drafter: --suffix-max-nodes must be >= 1 and --suffix-alpha > 0")
        self.depth_cap = c.max_match + c.max_depth  # the trie must hold the pattern and what follows it
        self.global_trie = SuffixTrie(self.depth_cap)
        for seq in corpus or []:
            self.global_trie.start_sequence()
            self.global_trie.extend(seq)
        self.rows: list[_Row] = []
        self.last_choice: list[str] = []  # per row: "local" / "global" / "none" (for tests and debugging)

    # -- rows ---------------------------------------------------------------------------------------
    def _new_row(self, history: list[int]) -> _Row:
        trie = SuffixTrie(self.depth_cap)
        trie.extend(history)
        return _Row(trie=trie, tokens=list(history), prompt_len=len(history) - 1)

    def _retire(self, row: _Row) -> None:
        """A row's turn is over: its output joins the global structure."""
        out = row.tokens[row.prompt_len:]
        if len(out) > 1:
            self.global_trie.start_sequence()
            self.global_trie.extend(out)

    def sync(self, ctx: DraftContext) -> None:
        for row, hist in zip(self.rows, ctx.history):
            if len(hist) > len(row.tokens):
                new = hist[len(row.tokens):]
                row.trie.extend(new)
                row.tokens.extend(new)

    def begin(self, ctx: DraftContext) -> None:
        for row in self.rows:
            self._retire(row)
        self.rows = [self._new_row(h) for h in ctx.history]

    def begin_row(self, ctx: DraftContext, b: int) -> None:
        hist = ctx.history[b]
        if b < len(self.rows):
            old = self.rows[b]
            if old.tokens == hist:  # a parked row restarted from the same context: nothing changed
                return
            self._retire(old)
            self.rows[b] = self._new_row(hist)
        else:
            self.rows.extend(self._new_row([0]) for _ in range(b - len(self.rows)))
            self.rows.append(self._new_row(hist))

    def keep_rows(self, rows: list[int]) -> None:
        kept = set(rows)
        for i, row in enumerate(self.rows):
            if i not in kept:
                self._retire(row)
        self.rows = [self.rows[r] for r in rows]

    def observe(self, ctx: DraftContext, committed: Committed) -> None:
        self.sync(ctx)

    # -- drafting -----------------------------------------------------------------------------------
    def tree_for(self, context: list[int], row: _Row | None = None) -> tuple[list, list, list, str]:
        """(tokens, parents, depths, source) of the draft tree for one row (parents index the list, -1 =
        root). The local structure is the row's own (or one built from `context` when row is None)."""
        c = self.cfg
        local = row.trie if row is not None else self._new_row(context).trie
        best, best_gain, source = ([], [], []), 1.0, "none"
        for name, trie, prior in (("local", local, c.prior), ("global", self.global_trie, c.global_prior)):
            node, m = trie.match(context, c.max_match)
            if m == 0:
                continue
            budget = min(c.max_nodes, max(1, math.ceil(c.alpha * m)))
            toks, pars, deps, scores = trie.expand(node, budget, c.min_prob, c.max_depth, m, prior)
            n, gain = self.best_prefix(scores)
            if gain > best_gain:
                best, best_gain, source = (toks[:n], pars[:n], deps[:n]), gain, name
        return (*best, source)

    def best_prefix(self, scores: list[float]) -> tuple[int, float]:
        """(n, gain) of the best-first prefix with the most expected tokens per verify cost (module
        docstring); (0, 1.0) when none beats a plain forward."""
        c = self.cfg
        best_n, best_gain, expected = 0, 1.0, 1.0
        for n, s in enumerate(scores, 1):
            expected += s
            gain = expected / (1.0 + c.verify_overhead + c.verify_per_node * n)
            if gain > best_gain:
                best_n, best_gain = n, gain
        return best_n, best_gain

    def propose(self, ctx: DraftContext) -> Proposal:
        self.sync(ctx)
        trees = []
        self.last_choice = []
        for row, hist in zip(self.rows, ctx.history):
            toks, pars, deps, source = self.tree_for(hist, row)
            trees.append((toks, pars, deps))
            self.last_choice.append(source)
        dev = ctx.device
        if all(pars == list(range(-1, len(pars) - 1)) for _, pars, _ in trees):
            # every row's tree is a single path (or empty): verified as a ragged chain, which costs less on
            # the host than a tree (no tree mask, no KV compaction) and decides the same
            counts = [len(toks) for toks, _, _ in trees]
            tokens = torch.zeros(len(trees), max(counts), dtype=torch.long)
            for b, (toks, _, _) in enumerate(trees):
                tokens[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            return Proposal(tokens=tokens.to(dev), num_draft=torch.tensor(counts).to(dev), num_draft_host=counts)
        B, T = len(trees), 1 + max(len(t[0]) for t in trees)
        tokens = torch.zeros(B, T, dtype=torch.long)
        parents = torch.full((B, T), -1, dtype=torch.long)
        depth = torch.zeros(B, T, dtype=torch.long)
        for b, (toks, pars, deps) in enumerate(trees):
            tokens[b, 0] = ctx.history[b][-1]
            n = len(toks)
            if n:
                tokens[b, 1:n + 1] = torch.tensor(toks)
                parents[b, 1:n + 1] = torch.tensor(pars) + 1  # list index -> node index (root = 0)
                depth[b, 1:n + 1] = torch.tensor(deps)
        num_nodes = torch.tensor([1 + len(t[0]) for t in trees])
        max_depth = max([max(t[2]) for t in trees if t[2]] or [0])
        max_kids = max([max(Counter(t[1]).values()) for t in trees if t[1]] or [0])
        return Proposal(tokens=tokens.to(dev), parents=parents.to(dev), depth=depth.to(dev),
                        num_nodes=num_nodes.to(dev), bounds=(max_depth, max_kids))  # host-known: no device read


def parse_verify_cost(spec: str) -> tuple[float, float]:
    """--suffix-verify-cost A,B -> (verify_overhead, verify_per_node)."""
    try:
        a, b = (float(x) for x in spec.split(","))
    except ValueError:
        raise UserError(f"--suffix-verify-cost takes two numbers A,B (e.g. 0.05,0.055), got {spec!r}") from None
    if a < 0 or b < 0:
        raise UserError(f"--suffix-verify-cost: A and B must be >= 0, got {spec!r}")
    return a, b


SHIPPED_CORPORA = ("smollm2",)  # harness/suites/suffix_corpus_<name>.jsonl


def read_corpus(path: str, tokenizer) -> list[list[int]]:
    """--suffix-corpus: a text file (one document per blank-line separated block), a .jsonl whose lines
    are strings or objects with a 'text' field, or the name of a shipped corpus (SHIPPED_CORPORA), tokenized
    with the target's tokenizer."""
    import json
    from importlib import resources

    p = Path(path)
    if path in SHIPPED_CORPORA:
        p = Path(str(resources.files("harness.suites") / f"suffix_corpus_{path}.jsonl"))
    if not p.is_file():
        raise UserError(f"suffix corpus {path} not found: give a .txt or .jsonl file, or one of "
                        f"{', '.join(SHIPPED_CORPORA)}")
    if tokenizer is None:
        raise UserError("--suffix-corpus needs a target with a tokenizer")
    text = p.read_text(encoding="utf-8")
    docs = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"suffix corpus {path}:{i}: not valid JSON") from None
            doc = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(doc, str):
                raise UserError(f"suffix corpus {path}:{i}: expected a string or an object with a 'text' string")
            docs.append(doc)
    else:
        docs = [d for d in text.split("\n\n") if d.strip()]
    return [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
