"""vLLM peers: `vllm` (plain decoding), `vllm-ngram`, `vllm-draft` and `vllm-eagle3`, run in vLLM's own
virtual environment (scripts/setup_vllm.sh) through a worker process (harness/peers/vllm_worker.py)
that the harness starts once per drafter and feeds token ids over JSON lines.

Same prompts as our loop: our tokenizer applies the chat template and vLLM receives the token ids; the
same max tokens, temperature (greedy at 0) and stop ids; the same weights (the transformers folder our
target loads, fp32 on CPU). vLLM drafts with K = --k tokens. vllm-eagle3's head is --vllm-head DIR, else the
eagle3 head shipped for the target, exported into the cache once (`exported_head`); vllm-draft's draft model
is --draft-model (`spec-harness subset-model` writes one from the target, harness.targets.subset).

Records. vLLM reports, per request, the accepted and drafted counts of every verify step that had drafts
(per_request_spec_decode_metrics="detailed"); the worker's step loop counts the target forwards that
gave the request tokens and how many each gave (prefill first). From these the peer writes step records
like our loop's: one per decode forward (the prefill's token, like ours, is not a step), with drafted,
depth (= drafted, chains), accepted, emitted (tokens kept: the last step's may be cut at a stop id or at
max tokens, accepted is not) and t_other = the forward's wall time (vLLM's step is not split into
phases). A forward that emitted one token is a verify step with nothing accepted or a forward without
drafts (ngram without a match); steps are matched to forwards in order (see `step_records`), so only
such one-token steps can trade places. tau, acceptance by position and accept rate then come out of
harness.reports.summary like every other drafter's.

Per prompt the record also holds `vllm_counters`: the difference of vLLM's cumulative counters
(llm.get_metrics(): vllm:spec_decode_num_drafts, _num_draft_tokens, _num_accepted_tokens,
_num_accepted_tokens_per_pos) over that prompt, and `forwards` (decode forwards). tau from the
counters, (forwards + num_accepted_tokens - cut) / forwards with `cut` the tokens dropped at the end of
turns, equals new tokens / forwards (tests/test_vllm_peer.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parents[1] / "peers" / "vllm_worker.py"
SETUP = "bash scripts/setup_vllm.sh"

VLLM_DRAFTERS = {
    "vllm": "peer: vLLM plain decoding (vLLM's own venv: scripts/setup_vllm.sh)",
    "vllm-ngram": "peer: vLLM n-gram speculation (K = --k, prompt lookup n = 1..4)",
    "vllm-draft": "peer: vLLM with a draft model (--draft-model; `spec-harness subset-model` writes one)",
    "vllm-eagle3": "peer: vLLM EAGLE-3 with a head in vLLM's layout (--vllm-head, default the shipped one, exported)",
}
NGRAM_MAX, NGRAM_MIN = 4, 1  # vLLM's prompt_lookup_max / _min


def is_vllm(name: str) -> bool:
    return name in VLLM_DRAFTERS


def vllm_python() -> Path:
    """The python of vLLM's venv: $SPEC_HARNESS_VLLM_VENV, else .venv-vllm in the repository root."""
    venv = Path(os.environ.get("SPEC_HARNESS_VLLM_VENV", ROOT / ".venv-vllm"))
    py = venv / "bin" / "python"
    if not py.is_file():
        raise UserError(f"vLLM's virtual environment is missing ({venv}): create it with `{SETUP}` "
                        "(or `make vllm-venv`), or point SPEC_HARNESS_VLLM_VENV at one")
    return py


def exported_head(target_name: str) -> Path:
    """The eagle3 head shipped for this target (harness/heads/<target>-eagle3) in vLLM's EAGLE-3 layout:
    written by export_head (fp32, an exact copy of the bf16 weights) into the cache once, in a folder named
    by a digest of the shipped files and of the config it writes, so a retrained head or a changed export
    gets a fresh copy."""
    import hashlib

    import torch

    from harness.drafters.heads import read_config, shipped_head
    from harness.drafters.interop import eagle3_config, export_head
    from harness.targets.loading import cache_root

    src = shipped_head(target_name, "eagle3")
    if src is None:
        raise UserError(f"no eagle3 head ships for target '{target_name}': pass --vllm-head DIR (a folder "
                        "`spec-harness export-head` wrote)")
    digest = hashlib.sha256()  # the shipped files and the config export_head writes for them
    for name in ("config.json", "model.safetensors"):
        digest.update((src / name).read_bytes())
    digest.update(json.dumps(eagle3_config(read_config(src), torch.float32), sort_keys=True).encode())
    out = cache_root() / "vllm-heads" / f"{target_name}-eagle3-{digest.hexdigest()[:16]}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        export_head(src, tmp, dtype=torch.float32)
        try:
            tmp.rename(out)
        except OSError:  # another process wrote it first: theirs is the same export
            shutil.rmtree(tmp)
    return out


def head_for(target_name: str, extra: dict) -> Path:
    """vllm-eagle3's head: --vllm-head DIR when given, else the shipped one exported (exported_head)."""
    path = Path(extra["vllm_head"]) if extra.get("vllm_head") else exported_head(target_name)
    check_head(path)
    return path.resolve()


def speculative_config(name: str, k: int, draft_folder: str | None = None, head: str | None = None) -> dict | None:
    """vLLM's speculative_config for a drafter name (None: plain decoding)."""
    if name == "vllm":
        return None
    if name == "vllm-ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": NGRAM_MAX,
                "prompt_lookup_min": NGRAM_MIN}
    if name == "vllm-draft":
        return {"method": "draft_model", "model": draft_folder, "num_speculative_tokens": k}
    if name == "vllm-eagle3":
        return {"method": "eagle3", "model": head, "num_speculative_tokens": k}
    raise UserError(f"unknown vLLM drafter '{name}': choose from {', '.join(VLLM_DRAFTERS)}")


def check_head(path: Path) -> None:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"no vLLM EAGLE-3 head at {path}: write one with `spec-harness export-head` or pass "
                        "--vllm-head DIR (a folder with config.json and model.safetensors)")
    arch = json.loads(cfg.read_text()).get("architectures") or []
    if not any("Eagle3" in a for a in arch):
        raise UserError(f"{cfg} is not a vLLM EAGLE-3 head (architectures {arch}): pass the folder "
                        "`spec-harness export-head` wrote")


# ----------------------------------------------------------------------------- records

def step_records(emitted: list[int], step_accepted: list[int], step_drafted: list[int],
                 step_s: list[float] | None = None) -> list[dict]:
    """Step records of one turn (module docstring). emitted: tokens per target forward, prefill first;
    step_accepted / step_drafted: per verify step with drafts, in order; step_s: per forward, seconds.
    Forwards are matched in order: a forward is the next verify step when its tokens fit that step
    (accepted + 1, or fewer for the turn's last forward, cut at a stop id or max tokens), else it had
    no drafts and emitted one token. A one-token forward that fits a verify step which accepted nothing
    is taken as that step: the two are alike in the outputs and only they can trade places."""
    forwards = emitted[1:]
    step_s = (step_s or [])[1:]
    n_draft, i, out = len(step_accepted), 0, []
    for f, e in enumerate(forwards):
        last = f == len(forwards) - 1
        fits = i < n_draft and (e == step_accepted[i] + 1 or (last and e <= step_accepted[i] + 1))
        if len(forwards) - f == n_draft - i and not fits:
            raise RuntimeError(f"vLLM's {n_draft} verify steps do not fit its forwards' outputs {forwards}")
        if fits:
            drafted, accepted = step_drafted[i], step_accepted[i]
            i += 1
        elif e == 1:
            drafted, accepted = 0, 0
        else:
            raise RuntimeError(f"a forward emitted {e} tokens without a verify step to account for them")
        out.append(dict(drafted=drafted, depth=drafted, accepted=accepted, emitted=e, t_draft=0.0,
                        t_verify=0.0, t_accept=0.0, t_other=step_s[f] if f < len(step_s) else 0.0))
    if i != n_draft:
        raise RuntimeError(f"vLLM reported {n_draft} verify steps but only {i} matched its {len(forwards)} forwards")
    return out


def add_counters(total: dict | None, delta: dict) -> dict:
    if total is None:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in delta.items()}
    for key, v in delta.items():
        if isinstance(v, list):
            cur = total.setdefault(key, [])
            cur.extend([0] * (len(v) - len(cur)))
            for j, x in enumerate(v):
                cur[j] += x
        else:
            total[key] = total.get(key, 0) + v
    return total


def counters_from_steps(steps: list[dict], k: int) -> dict:
    """What vLLM's counters should read for these step records (drafts-free forwards count nothing)."""
    drafted = [s for s in steps if s["drafted"] > 0]
    per_pos = [sum(1 for s in drafted if s["accepted"] > j) for j in range(k)]
    return dict(num_drafts=len(drafted), num_draft_tokens=sum(s["drafted"] for s in drafted),
                num_accepted_tokens=sum(s["accepted"] for s in drafted), num_accepted_tokens_per_pos=per_pos)


def tau_from_counters(counters: dict, forwards: int, cut: int) -> float:
    """Tokens per decode forward from vLLM's counters: every forward emits one token plus what it accepted,
    less the `cut` tokens dropped after a stop id or past max tokens at the end of turns."""
    return (forwards + counters["num_accepted_tokens"] - cut) / forwards


# ----------------------------------------------------------------------------- the worker

@dataclass
class TurnResult:
    new_ids: list[int]
    steps: list[dict] = field(default_factory=list)


class WorkerProcess:
    """The worker, started once, spoken to over JSON lines; its stderr goes to a log file."""

    def __init__(self, start: dict, log_dir: Path | None = None):
        py = vllm_python()
        self.log = Path(tempfile.mkstemp(prefix="vllm-worker-", suffix=".log", dir=log_dir)[1])
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # our packages stay out of vLLM's interpreter
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.proc = subprocess.Popen([str(py), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "w"), text=True, env=env, cwd=str(ROOT))
        self.info = self.call(start)

    def call(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise UserError(f"the vLLM worker stopped: {self._last_log_line()} (full log: {self.log})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise UserError(f"vLLM failed: {reply.get('error')} (log: {self.log})")
        return reply

    def _last_log_line(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln]
        return (errors or lines or ["no output"])[-1].strip()[:300]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()


class VLLMPeer:
    """A vLLM drafter as a peer of harness.runner: `generate` decodes one turn, `take_fields` hands the
    runner the prompt's vLLM fields (worker wall time, counters, forwards) once its turns are done."""

    peer = True
    has_q = False
    hidden_layers = ()

    def __init__(self, name: str, model_folder: str, k: int, *, device: str = "cpu", dtype: str = "float32",
                 max_len: int = 2048, seed: int = 0, speculative: dict | None = None, tensor_parallel: int = 1,
                 threads: int | None = None, max_num_seqs: int = 1, compile: bool = True):
        self.name, self.k, self.seed = name, k, seed
        start = dict(op="start", model=model_folder, speculative=speculative, dtype=dtype, max_model_len=max_len,
                     seed=seed, tensor_parallel_size=tensor_parallel, device=device, threads=threads,
                     max_num_seqs=max_num_seqs, compile=compile)
        self.worker = WorkerProcess(start)
        weakref.finalize(self, self.worker.close)
        self.speculative = speculative
        self._fields: dict = {}

    def environment(self) -> dict:
        """For env.json: the vLLM venv's versions, the engine's start time and the speculative config."""
        info = {k: v for k, v in self.worker.info.items() if k != "ok"}
        return dict(info, venv=str(vllm_python().parent.parent), speculative_config=self.speculative)

    def generate_many(self, requests: list[dict]) -> dict:
        """One batch in one generate call; requests as in the worker's protocol."""
        return self.worker.call({"op": "generate", "requests": requests})

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, eos: set[int]) -> TurnResult:
        reply = self.generate_many([dict(prompt_ids=list(prompt_ids), max_tokens=max_new_tokens,
                                         temperature=temperature, stop_ids=sorted(eos), seed=self.seed)])
        res = reply["results"][0]
        steps = step_records(res["emitted"], res["step_accepted"], res["step_drafted"], res.get("step_s"))
        f = self._fields
        f["wall_s"] = f.get("wall_s", 0.0) + res["wall_s"]
        f["forwards"] = f.get("forwards", 0) + len(steps)
        f["vllm_counters"] = add_counters(f.get("vllm_counters"), reply["counters"])
        f["cut_tokens"] = f.get("cut_tokens", 0) + sum(s["accepted"] + 1 - s["emitted"] for s in steps[-1:])
        return TurnResult(new_ids=list(res["output_ids"]), steps=steps)

    def take_fields(self) -> dict:
        """The prompt record's vLLM fields (wall_s measured in the worker, around its step loop)."""
        fields, self._fields = self._fields, {}
        return fields

    def close(self) -> None:
        self.worker.close()


def build_vllm_peer(name: str, target, cfg) -> VLLMPeer:
    from harness.targets.loading import resolve_source

    extra = cfg.extra or {}
    folder = resolve_source(cfg.target)[1]
    draft_folder = head = None
    if name == "vllm-draft":
        if not cfg.draft_model:
            raise UserError("vllm-draft needs --draft-model (a preset, model folder or .gguf; `spec-harness "
                            "subset-model --skip-layers 14-29 --out DIR` writes one from the target)")
        draft_folder = resolve_source(cfg.draft_model)[1]
    if name == "vllm-eagle3":
        head = str(head_for(target.name, extra))
    import torch

    dtype = str(target.dtype).replace("torch.", "")
    return VLLMPeer(name, folder, cfg.k, device=target.device.type, dtype=dtype, max_len=target.max_len,
                    seed=cfg.seed, speculative=speculative_config(name, cfg.k, draft_folder, head),
                    tensor_parallel=int(extra.get("vllm_tensor_parallel_size", 1)),
                    threads=torch.get_num_threads(), max_num_seqs=max(1, cfg.batch_size),
                    compile=not extra.get("vllm_eager", False))


__all__ = ["VLLM_DRAFTERS", "VLLMPeer", "build_vllm_peer", "exported_head", "head_for", "is_vllm",
           "speculative_config", "step_records",
           "tau_from_counters", "vllm_python"]
