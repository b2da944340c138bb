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
factor is also weighted by m / (m + prior), m = the tokens of context it rests on. The tree keeps
the best-scoring nodes (best-first, so every kept node's ancestors are kept), at most
budget = min(max_nodes, ceil(alpha * match length)) of them (SuffixDecoding's adaptive max_spec) and
none scoring below min_prob. The local and the global structure each propose a tree; the one with the
higher expected accepted length (the sum of its scores) is used, and none when that is below min_score: on
a CPU a verify forward of 2+ tokens costs about 1.5 one-token forwards, so a weak guess costs more than it
earns.

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
    uses (mini prompts 3-4 of each category, and the calibration suite) through the drafter, with a verify
    forward costing what it measured on this project's CPU (1 token 90 ms, 2-10 tokens 140-190 ms)."""

    max_match: int = 12  # longest context suffix matched (tokens)
    max_depth: int = 12  # longest drafted path below the match
    max_nodes: int = 10  # draft nodes per step at most (the root excluded)
    alpha: float = 2.0  # node budget per matched token (SuffixDecoding's max_spec = alpha * match length)
    min_prob: float = 0.1  # drop nodes whose path score is below this
    prior: float = 2.0  # match-length confidence m / (m + prior) on each step's counts (0: pure counts)
    min_score: float = 1.0  # propose nothing when the tree's expected accepted length is below this


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
                or c.prior < 0 or c.min_score < 0:
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
        best, best_score, source = ([], [], []), 0.0, "none"
        for name, trie in (("local", local), ("global", self.global_trie)):
            node, m = trie.match(context, c.max_match)
            if m == 0:
                continue
            budget = min(c.max_nodes, max(1, math.ceil(c.alpha * m)))
            toks, pars, deps, scores = trie.expand(node, budget, c.min_prob, c.max_depth, m, c.prior)
            score = sum(scores)
            if score >= c.min_score and score > best_score:
                best, best_score, source = (toks, pars, deps), score, name
        return (*best, source)

    def propose(self, ctx: DraftContext) -> Proposal:
        self.sync(ctx)
        trees = []
        self.last_choice = []
        for row, hist in zip(self.rows, ctx.history):
            toks, pars, deps, source = self.tree_for(hist, row)
            trees.append((toks, pars, deps))
            self.last_choice.append(source)
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
        dev = ctx.device
        max_depth = max([max(t[2]) for t in trees if t[2]] or [0])
        max_kids = max([max(Counter(t[1]).values()) for t in trees if t[1]] or [0])
        return Proposal(tokens=tokens.to(dev), parents=parents.to(dev), depth=depth.to(dev),
                        num_nodes=num_nodes.to(dev), bounds=(max_depth, max_kids))  # host-known: no device read


def read_corpus(path: str, tokenizer) -> list[list[int]]:
    """--suffix-corpus: a text file (one document per blank-line separated block) or a .jsonl whose lines
    are strings or objects with a 'text' field, tokenized with the target's tokenizer."""
    import json

    p = Path(path)
    if not p.is_file():
        raise UserError(f"suffix corpus {path} not found: give a .txt or .jsonl file")
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
