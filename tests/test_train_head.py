"""`spec-harness train-head`: self-distillation data, the held-out accuracy meter, the corpus, and a short
end-to-end run on a tiny model."""

import json

import pytest
import torch
from conftest import tiny_model
from test_eagle import PROMPT, oracle_head, one_layer_model

from harness.cli import main
from harness.training.corpus import _shingles, build_corpus, suite_shingles
from harness.engine.scheduler import decode
from harness.drafters.ar import AR
from harness.drafters.eagle import EagleDrafter, TreeShape
from harness.drafters.heads import Frozen, load_head
from harness.targets import build_target, load_target
from harness.training.train_head import Unrolled, heldout_accuracy, self_distill


def test_self_distillation_data_lines_up():
    """Answers equal greedy decoding; features and p are the target's own, row for row."""
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    prompts = [PROMPT, PROMPT[:9], PROMPT[5:20]]
    data = self_distill(target, prompts, (1, -1), max_new=10, batch=2, eos={257})
    for prompt, d in zip(prompts, data):
        ref = decode(target, AR(), prompt, max_new_tokens=10, k=1, temperature=0, seed=0, eos_ids={257}).new_ids
        assert d["ids"] == prompt + ref and d["plen"] == len(prompt)
        n = len(d["ids"]) - 1
        assert d["feats"].shape == (n, 2, target.hidden_size) and d["p_ids"].shape == (n, 32)
        target.reset(1)
        out = target.forward(torch.tensor([d["ids"][:n]]), hidden_layers=(1, -1))
        torch.testing.assert_close(d["feats"][:, 0], out.hidden[1][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(d["feats"][:, 1], out.hidden[-1][0], atol=1e-4, rtol=0)
        assert d["p_ids"][len(prompt) - 1:, 0].tolist() == d["ids"][len(prompt):]  # greedy answers


def test_self_distillation_rows_that_end_early_leave_the_batch():
    """A row that emits EOS leaves its batch (the cache shrinks) while the others go on: every row's answer,
    features and p still equal that prompt answered alone."""
    target = build_target(tiny_model(), None, "tiny", "native", max_len=256)
    prompts = [PROMPT, PROMPT[:9], PROMPT[5:20], PROMPT[2:14]]
    free = self_distill(target, prompts, (-1,), max_new=12, batch=4, eos=set())
    first = [d["ids"][d["plen"]:] for d in free]
    eos = {first[1][2]}  # prompt 1 ends at its third token; prompts without that token answer all 12
    assert any(not eos & set(a) for a in first), "a row must outlive the one that ends early"
    shrunk = []
    keep_rows = target.keep_rows
    target.keep_rows = lambda rows: (shrunk.append(len(rows)), keep_rows(rows))
    data = self_distill(target, prompts, (-1,), max_new=12, batch=4, eos=eos)
    del target.keep_rows
    assert shrunk and shrunk[0] < 4
    for prompt, d in zip(prompts, data):
        alone = self_distill(target, [prompt], (-1,), max_new=12, batch=1, eos=eos)[0]
        assert d["ids"] == alone["ids"]
        torch.testing.assert_close(d["feats"], alone["feats"], atol=1e-4, rtol=0)
        assert d["p_ids"][:, 0].tolist() == alone["p_ids"][:, 0].tolist()
    assert len(data[1]["ids"]) - data[1]["plen"] == 3


def test_heldout_accuracy_of_an_exact_head_is_one():
    """On a bigram target the oracle head is exact, so every depth's accuracy is 1; a random head's is ~0."""
    model = one_layer_model(0.0)
    target = build_target(model, None, "tiny", "native", max_len=256)
    head, frozen = oracle_head(target, "eagle", model)
    with torch.no_grad():
        head.layer.wo.weight.zero_()
    data = self_distill(target, [PROMPT, PROMPT[3:]], (-1,), max_new=20, batch=2, eos=set())
    acc = heldout_accuracy(Unrolled(head, frozen, 1, 0.1), data)
    assert acc["cumulative"] == [1.0] * 5 and acc["positions"] > 20
    assert acc["expected_tau_chain5"] == 6.0


def test_corpus_is_deterministic_and_disjoint_from_the_suites():
    a, b = build_corpus(120, seed=0), build_corpus(120, seed=0)
    assert a == b and len(a) == 120 and len(set(a)) == 120
    assert build_corpus(120, seed=1) != a
    banned = suite_shingles()
    assert banned and not any(_shingles(text) & banned for text in a)
    assert any("```python" in t for t in a) and any("Write a Python function" in t for t in a)


@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
def test_train_head_end_to_end(tmp_path, tiny_dir, monkeypatch, variant):
    monkeypatch.setattr("harness.training.corpus.build_corpus",
                        lambda n, seed: [f"Say something about the number {i}." for i in range(n)])
    out = tmp_path / "head"
    argv = ["train-head", "--target", str(tiny_dir), "--variant", variant, "--out", str(out), "--prompts", "6",
            "--max-new-tokens", "12", "--epochs", "2", "--batch-size", "2", "--gen-batch", "4", "--device", "cpu"]
    if variant == "eagle3":
        argv += ["--draft-vocab", "64", "--unroll", "2"]
    assert main(argv) == 0
    for name in ("config.json", "model.safetensors", "training_log.json", "training_log.csv", "loss.png",
                 "accuracy.csv", "generated.jsonl"):
        assert (out / name).is_file(), name
    log = json.loads((out / "training_log.json").read_text())
    assert log["command"].startswith(f"spec-harness train-head --target {tiny_dir} --variant {variant}")
    assert len(log["heldout_accuracy"]["cumulative"]) == 5 and log["prompts"] == 6 and log["wall_s"] > 0
    lines = (out / "generated.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["ids"] for x in lines)
    rows = (out / "training_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and len(rows) == 1 + 2 * 3  # 5 training prompts, batches of 2
    # the head it wrote drafts losslessly for its target
    target = load_target(str(tiny_dir), backend="native", device="cpu", dtype="float32", max_len=256)
    head = load_head(out, target, variant)
    ref = decode(target, AR(), PROMPT, max_new_tokens=16, k=3, temperature=0, seed=0, eos_ids=set()).new_ids
    for tree in (None, TreeShape(3, 2, 4)):
        drafter = EagleDrafter(head, Frozen.of(target), variant, tree, 256, target.device)
        assert decode(target, drafter, PROMPT, max_new_tokens=16, k=3, temperature=0, seed=0,
                      eos_ids=set()).new_ids == ref
    assert main(argv) == 2  # an existing folder is refused without --overwrite


def test_init_head_starts_from_that_head(tmp_path, tiny_dir, monkeypatch):
    """--init-head fine-tunes an existing head: with a learning rate too small to move a weight, the new head
    is the old one (its draft vocabulary too), where fresh weights would differ everywhere; mismatches are
    refused with exit 2."""
    from safetensors.torch import load_file

    monkeypatch.setattr("harness.training.corpus.build_corpus",
                        lambda n, seed: [f"Say something about the number {i}." for i in range(n)])
    base = ["train-head", "--target", str(tiny_dir), "--variant", "eagle3", "--prompts", "6",
            "--max-new-tokens", "12", "--epochs", "1", "--batch-size", "2", "--gen-batch", "4", "--device", "cpu",
            "--unroll", "2"]
    assert main(base + ["--out", str(tmp_path / "a"), "--draft-vocab", "64"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--init-head", str(tmp_path / "a"), "--lr", "1e-12",
                        "--seed", "1"]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "b" / "training_log.json").read_text())
    assert log["init_head"] == str(tmp_path / "a") and f"--init-head {tmp_path / 'a'}" in log["command"]
    assert main(base + ["--out", str(tmp_path / "c"), "--seed", "1", "--draft-vocab", "64"]) == 0
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert not torch.equal(a["midlayer.self_attn.q_proj.weight"], c["midlayer.self_attn.q_proj.weight"])
    for extra in (["--init-head", str(tmp_path / "missing")], ["--init-head", str(tmp_path / "a"), "--draft-vocab", "32"],
                  ["--init-head", str(tmp_path / "a"), "--variant", "eagle"]):
        argv = base + ["--out", str(tmp_path / "d"), "--overwrite"] + extra
        assert main(argv) == 2, extra


def test_train_head_on_sharegpt_features_resumes_exactly(tmp_path, tiny_dir, monkeypatch):
    """--data sharegpt end to end on a tiny target (a fake conversation source), and a run interrupted after
    two optimiser steps and continued with --resume ends with the same weights as an uninterrupted one."""
    from test_sharegpt import FAKE

    from harness.training import features
    from harness.training.train_head import Unrolled as U

    monkeypatch.setattr(features, "conversations", lambda seed: list(FAKE))
    monkeypatch.setattr(features.SuiteFilter, "for_suites", classmethod(lambda cls, tok: cls(tok)))
    monkeypatch.setattr(features, "HOLDOUT_EVERY", 5)
    monkeypatch.setattr(features, "SHARD_TOKENS", 300)
    common = ["train-head", "--target", str(tiny_dir), "--variant", "eagle3", "--data", "sharegpt",
              "--features", str(tmp_path / "feat"), "--tokens", "900", "--self-tokens", "300", "--max-len", "256",
              "--max-new-tokens", "12", "--draft-vocab", "64", "--epochs", "2", "--batch-size", "2",
              "--gen-batch", "4", "--device", "cpu", "--checkpoint-minutes", "1e-9"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert log["data"] == "sharegpt" and set(log["heldout_accuracy"]["by_mode"]) == {"self", "teacher"}
    assert log["dropped_for_suite_overlap"] == {"teacher": 0, "self": 0} and 0 < log["draft_vocab_coverage"] <= 1
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    assert log["feature_key"]["dtype"] == "float32"
    # a bf16 target's features differ from an fp32 one's: the folder is not reused across dtypes
    assert main(common + ["--out", str(tmp_path / "c"), "--dtype", "bfloat16"]) == 2
    assert not list((tmp_path / "feat").glob("*.pt.tmp"))
    target = load_target(str(tiny_dir), backend="native", device="cpu", dtype="float32", max_len=256)
    head = load_head(tmp_path / "a", target, "eagle3")
    ref = decode(target, AR(), PROMPT, max_new_tokens=16, k=3, temperature=0, seed=0, eos_ids=set()).new_ids
    drafter = EagleDrafter(head, Frozen.of(target), "eagle3", None, 256, target.device)
    assert decode(target, drafter, PROMPT, max_new_tokens=16, k=3, temperature=0, seed=0, eos_ids=set()).new_ids == ref

    calls = {"n": 0}
    forward = U.forward

    def dies_on_the_third_step(self, *a, **kw):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return forward(self, *a, **kw)

    monkeypatch.setattr(U, "forward", dies_on_the_third_step)
    assert main(common + ["--out", str(tmp_path / "b")]) == 130
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    monkeypatch.setattr(U, "forward", forward)
    assert main(common + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "b" / "training_log.csv").read_text().splitlines()
    assert len(rows) == len((tmp_path / "a" / "training_log.csv").read_text().splitlines())
