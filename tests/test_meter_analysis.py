"""The surplus report (spec-harness surplus) on a simulated run folder, and the hidden-state probe (CPU)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from harness.meter import probe; from harness.meter import surplus
from harness.errors import UserError
from harness.meter.core import Meter
from harness.meter.ngram_base import NgramBase
from harness.records import JsonlWriter

from _meter_sim import MarkovSource, simulate


def _bigram(src: MarkovSource) -> np.ndarray:
    J = src.joint(1).sum(0)
    return J / J.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with three drafters: 'draft' (a q whose quality varies by prompt), 'ngram' (one-hot,
    no q) and 'ar' (no drafts)."""
    src = MarkovSource(V=5, k=2, seed=7, concentration=0.4)
    base = NgramBase.fit(src.sample(100, 500, seed=1), order=3, vocab_size=src.V)
    rng = np.random.default_rng(0)
    noise = rng.dirichlet(np.ones(src.V), size=src.V)
    good = _bigram(src)
    path = tmp_path_factory.mktemp("run")
    steps, prompts = JsonlWriter(path / "steps.jsonl"), JsonlWriter(path / "prompts.jsonl")
    mix = (np.arange(14) + 0.5)[:, None, None] / 14
    plans = [("draft", mix * good + (1 - mix) * noise, 4, False, 14), ("ngram", good, 3, True, 6),
             ("ar", None, 0, False, 6)]
    for drafter, table, K, one_hot, n in plans:
        meter = Meter("cpu", max_steps=64, max_depth=K, base=base)
        committed, contexts, nds, accs = simulate(src, table, K=K, B=n, steps=50, seed=100, meter=meter,
                                                  one_hot=one_hot)
        for i, seq in enumerate(meter.flush(committed, contexts)):
            cat = "code" if i % 2 else "chat"
            for s, rec in enumerate(seq):
                nd, a = int(nds[s, i]), int(accs[s, i])
                steps.write({"drafter": drafter, "prompt_id": f"p{i}", "category": cat, "suite": "sim", "turn": 0,
                             "step": s, "rank": 0, "batch_size": n, "drafted": nd, "depth": nd, "accepted": a,
                             "emitted": a + 1, "t_draft": 0.0, "t_verify": 0.0, "t_accept": 0.0, "t_other": 0.0,
                             **rec})
            prompts.write({"drafter": drafter, "prompt_id": f"p{i}", "category": cat, "suite": "sim", "rank": 0,
                           "steps": len(seq), "new_tokens": len(committed[i])})
    steps.close()
    prompts.close()
    (path / "summary.md").write_text("# Run\n\nthe lead's table\n")
    return path


def _read_csv(path):
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_files_and_numbers(run_dir):
    surplus.write_report(run_dir)
    surplus.write_report(run_dir)                       # idempotent: one section in summary.md
    for name in ("surplus.md", "surplus.csv", "surplus_calibration.csv", "surplus_vs_acceptance.csv",
                 "surplus_vs_acceptance.png"):
        assert (run_dir / name).stat().st_size > 0
    summary = (run_dir / "summary.md").read_text()
    assert summary.startswith("# Run") and summary.count("## Information surplus") == 1
    rows = {(r["drafter"], r["category"]): r for r in _read_csv(run_dir / "surplus.csv")}
    assert {("draft", "all"), ("draft", "code"), ("draft", "chat"), ("ngram", "all"), ("ar", "all")} <= set(rows)
    # recompute the pooled means straight from the records
    recs = [json.loads(line) for line in open(run_dir / "steps.jsonl")]
    mine = [r for r in recs if r["drafter"] == "draft"]
    ub = np.mean([sum(r["surplus_ub"][1:]) for r in mine])
    use = np.mean([sum(v for v in r["surplus_use"][1:] if v is not None) for r in mine])
    tau = np.mean([r["emitted"] for r in mine])
    d = rows[("draft", "all")]
    assert float(d["surplus_ub"]) == pytest.approx(ub) and float(d["surplus_use"]) == pytest.approx(use)
    assert float(d["tau"]) == pytest.approx(tau)
    assert float(d["surplus_ub_lo"]) <= ub <= float(d["surplus_ub_hi"])
    assert 0 <= float(d["share_h_draft_gt"]) <= 1
    for other in ("ngram", "ar"):
        assert rows[(other, "all")]["surplus_use"] == "nan" and rows[(other, "all")]["h_draft"] == "nan"
    assert float(rows[("ar", "all")]["surplus_ub"]) == 0.0 and float(rows[("ar", "all")]["tau"]) == 1.0
    assert float(rows[("ar", "all")]["h_verify"]) > 0          # target side logged without a q


def test_report_correlations(run_dir):
    res = surplus.analyse(run_dir)
    row = next(r for r in res["table"] if r["drafter"] == "draft" and r["category"] == "all")
    pts = [p for p in res["points"] if p["drafter"] == "draft"]
    tau = np.array([p["tau"] for p in pts])
    kl = np.array([p["kl_tok"] for p in pts])
    assert row["rho_kl_tau"] == pytest.approx(spearmanr(kl, tau).statistic)
    # a drafter closer to the target has lower kl and longer acceptance, across prompts
    assert row["rho_kl_tau"] < -0.5 and row["rho_kl_tau_hi"] < 0
    assert row["rho_kl_tau_lo"] <= row["rho_kl_tau"] <= row["rho_kl_tau_hi"]
    calib = [c for c in res["calibration"] if c["drafter"] == "draft"]
    assert [c["depth"] for c in calib] == [1, 2, 3, 4]
    assert all(c["drafter"] == "draft" for c in res["calibration"])   # no q, no alpha for ngram / ar
    assert abs(calib[0]["diff"]) < 0.1


def test_report_needs_meter_fields(tmp_path):
    (tmp_path / "steps.jsonl").write_text(json.dumps({"drafter": "ar", "prompt_id": "p", "emitted": 1}) + "\n")
    with pytest.raises(UserError, match="meter"):
        surplus.analyse(tmp_path)


# ------------------------------------------------------------------ probe
def _markov_features(src: MarkovSource, n_seq: int, length: int, informative: bool):
    """h_t = a random linear map of one-hot(w_t) plus noise (informative) or pure noise."""
    seqs = np.array(src.sample(n_seq, length, seed=11))              # [S, L]
    wt, w1, w2 = seqs[:, :-2].reshape(-1), seqs[:, 1:-1].reshape(-1), seqs[:, 2:].reshape(-1)
    g = torch.Generator().manual_seed(0)
    if informative:
        h = torch.nn.functional.one_hot(torch.from_numpy(wt), src.V).float() @ torch.randn(src.V, 16, generator=g)
        h = h + 0.1 * torch.randn(len(wt), 16, generator=g)
    else:
        h = torch.randn(len(wt), 16, generator=g)
    return h, w1, w2, np.repeat(np.arange(n_seq), seqs.shape[1] - 2)


def test_probe_estimates_conditional_mutual_information():
    """With h_t carrying w_t, I(H_t; W_t+2 | W_t+1) = I(W_t; W_t+2 | W_t+1) = H(W | 1 prev) - H(W | 2 prev);
    the probe's V-information may fall short of it (probe underfit) but not by more than 0.06 nats; with
    h_t pure noise the estimate is 0 within 0.02 nats."""
    src = MarkovSource(V=6, k=2, seed=4, concentration=0.4)
    exact = src.cond_entropy(1) - src.cond_entropy(2)
    h_info, w1, w2, sid = _markov_features(src, 40, 300, informative=True)
    h_noise, *_ = _markov_features(src, 40, 300, informative=False)
    cfg = probe.ProbeConfig(embed=16, rank=16, hidden=64, batch=2048, lr=2e-2, patience=3)
    rows = probe.estimate({0: h_info, 1: h_noise}, w1, w2, sid, cfg)
    assert exact > 0.3
    assert abs(rows[0]["cmi"] - exact) < 0.06, (rows[0], exact)
    assert rows[0]["cmi_lo"] <= rows[0]["cmi"] <= rows[0]["cmi_hi"]
    assert abs(rows[1]["cmi"]) < 0.02, rows[1]
    assert rows[0]["ce_without_h"] == rows[1]["ce_without_h"]        # one shared probe without h


class _FakeTarget:
    """The Target interface the probe uses; hidden layer l >= 1 carries the current token, layer 0 noise."""

    num_layers, hidden_size, vocab_size = 3, 8, 6
    tokenizer = SimpleNamespace(encode=lambda text: [ord(c) % 6 for c in text])

    def __init__(self):
        self.emb = torch.randn(self.vocab_size, self.hidden_size, generator=torch.Generator().manual_seed(1))

    def reset(self, batch_size: int = 1):
        self.batch_size = batch_size

    def forward(self, ids, positions=None, hidden_layers=()):
        assert ids.shape[0] == self.batch_size
        B, T = ids.shape
        hidden = {l: (self.emb[ids] if l else torch.randn(B, T, self.hidden_size)) for l in hidden_layers}
        return SimpleNamespace(logits=torch.zeros(B, T, self.vocab_size), hidden=hidden)


def test_probe_cli_with_a_fake_target(tmp_path, monkeypatch):
    src = MarkovSource(V=6, k=2, seed=4, concentration=0.4)
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps({"ids": s}) + "\n" for s in src.sample(24, 200, seed=3)))
    monkeypatch.setattr(probe, "_load_target", lambda name: _FakeTarget())
    parser = argparse.ArgumentParser()
    probe.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "probe"
    args = parser.parse_args(["probe", "--target", "fake", "--ids", str(ids), "--ctx", "64", "--max-tokens", "4000",
                              "--preset", "quick", "--out", str(out)])
    assert args.func(args) == 0
    rows = _read_csv(out / "probe.csv")
    assert [int(r["layer"]) for r in rows] == [0, 1, 2]                 # default: spread over 3 layers
    assert float(rows[1]["cmi"]) > float(rows[0]["cmi"]) + 0.1
    for name in ("probe.md", "probe.png", "probe_config.json"):
        assert (out / name).stat().st_size > 0
    bad = parser.parse_args(["probe", "--target", "fake", "--ids", str(ids), "--layers", "7"])
    with pytest.raises(UserError, match="layers"):
        bad.func(bad)
