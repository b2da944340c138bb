"""Self-distillation: the target answers prompts greedily, and every fed token's hidden states and the
target's top-k next-token probabilities are kept (the data EAGLE heads train on)."""

from __future__ import annotations

import torch
from tqdm import tqdm

TOPK_P = 32  # target probabilities kept per position


@torch.inference_mode()
def self_distill(target, prompts: list[list[int]], layers: tuple[int, ...], max_new: int, batch: int,
                 eos: set[int], desc: str = "self-distillation") -> list[dict]:
    """The target answers every prompt greedily, in batches of similar length; a row that has answered (EOS)
    leaves its batch, so the steps after it run on the rows still answering. Per prompt: ids (prompt +
    answer), plen, and for every fed token (all but the last id) feats [n, L, H] (the given layers, in
    order) and the target's top-k p (p_ids, p_vals [n, TOPK_P]) for the token after it."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[dict | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", dynamic_ncols=True)
    dev = target.device
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        seqs = [prompts[i] for i in idx]
        B, lens = len(seqs), [len(s) for s in seqs]
        ids = torch.zeros(B, max(lens), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
        target.reset(B)
        o = target.forward(ids.to(dev), hidden_layers=layers)  # right-padded: causal rows never see padding
        target.commit(torch.tensor(lens, device=dev))
        chunks = [[_rows(o.hidden, o.logits, layers, b, slice(0, lens[b]))] for b in range(B)]
        nxt = o.logits[torch.arange(B, device=dev), torch.tensor(lens, device=dev) - 1].argmax(-1)
        answers, done = [[] for _ in range(B)], [False] * B
        live = list(range(B))  # the batch rows still answering, by their index in `seqs` (finished rows leave)
        for step in range(max_new):
            for b, t in zip(live, nxt.tolist()):
                answers[b].append(t)
                done[b] = t in eos
            if all(done) or step == max_new - 1:
                break
            keep = [j for j, b in enumerate(live) if not done[b]]
            if len(keep) < len(live):  # a finished row costs nothing more: the cache and the batch shrink
                target.keep_rows(keep)
                live, nxt = [live[j] for j in keep], nxt[torch.tensor(keep, device=dev)]
            o = target.forward(nxt[:, None], hidden_layers=layers)
            target.commit(torch.ones(len(live), dtype=torch.long, device=dev))
            for j, b in enumerate(live):
                chunks[b].append(_rows(o.hidden, o.logits, layers, j, slice(0, 1)))
            nxt = o.logits[:, 0].argmax(-1)
        for b, i in enumerate(idx):
            feats, p_ids, p_vals = (torch.cat([c[j] for c in chunks[b]]) for j in range(3))
            out[i] = dict(ids=seqs[b] + answers[b], plen=lens[b], feats=feats, p_ids=p_ids, p_vals=p_vals)
        bar.update(B)
    bar.close()
    return out


def _rows(hidden, logits, layers, b, sl):
    feats = torch.stack([hidden[layer][b, sl] for layer in layers], 1).float().cpu()  # [t, L, H]
    p_vals, p_ids = torch.softmax(logits[b, sl].float(), -1).topk(TOPK_P, dim=-1)
    return feats, p_ids.cpu(), p_vals.cpu()
