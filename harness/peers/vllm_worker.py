"""The vLLM worker: a script run by the python of vLLM's own virtual environment (scripts/setup_vllm.sh),
started once per vLLM drafter by harness.drafters.vllm_peer. It imports nothing from harness, so the two
environments keep their own torch and transformers.

Protocol: one JSON object per line. The worker reads requests on stdin and writes each reply on the
stdout it was started with; everything vLLM itself prints goes to stderr.

  {"op": "start", "model": DIR, "speculative": {...} | null, "dtype": "float32", "max_model_len": 2048,
   "seed": 0, "tensor_parallel_size": 1, "device": "cpu" | "cuda", "threads": 2, "max_num_seqs": 1,
   "compile": true (false: eager, no torch.compile)}
      -> {"ok": true, "vllm", "torch", "transformers", "python": versions, "start_s": seconds}
  {"op": "generate", "requests": [{"prompt_ids": [...], "max_tokens": N, "temperature": T,
   "stop_ids": [...], "seed": S}, ...]}
      -> {"ok": true, "wall_s": seconds for the whole batch, "counters": {...}, "results": [per request:
          {"output_ids", "wall_s" (from the batch's start to this request's end), "emitted" (tokens each
           target forward gave this request, prefill first), "step_s" (those forwards' engine steps'
           wall times), "step_accepted", "step_drafted" (per verify
           step that had drafts, in order), "finish_reason"}]}
  {"op": "stop"}
      -> exits

counters: the difference of llm.get_metrics()'s cumulative vllm:spec_decode_* counters over the
generate call: num_drafts, num_draft_tokens, num_accepted_tokens, num_accepted_tokens_per_pos.
A failure answers {"ok": false, "error": one line} and the worker waits for the next line.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def _reply_channel():
    """The protocol keeps the original stdout; fd 1 is pointed at stderr so that nothing else lands there."""
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


class Worker:
    def __init__(self):
        self.llm = None
        self.next_id = 0

    def start(self, msg: dict) -> dict:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: ~20 s a start
        if msg.get("device", "cpu") == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(msg.get("kv_cache_gb", 2)))
        if msg.get("threads"):
            os.environ["OMP_NUM_THREADS"] = str(msg["threads"])
        # vLLM's n-gram proposer runs a numba parallel loop (on one thread); numba's default OpenMP layer
        # beside torch's thread-bound OpenMP made each CPU step take 0.4-0.7 s instead of 0.05 s
        os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
        os.environ.setdefault("NUMBA_NUM_THREADS", "1")
        t0 = time.perf_counter()
        import vllm
        from vllm import LLM

        kw = dict(model=msg["model"], tokenizer=msg["model"], dtype=msg.get("dtype", "float32"),
                  max_model_len=msg.get("max_model_len", 2048), seed=msg.get("seed", 0),
                  tensor_parallel_size=msg.get("tensor_parallel_size", 1), disable_log_stats=False,
                  enable_prefix_caching=False,
                  max_num_seqs=max(1, msg.get("max_num_seqs", 1)))
        if msg.get("device") == "cuda":  # our target holds GPU memory too: vLLM takes a share, not 90%
            kw["gpu_memory_utilization"] = float(msg.get("gpu_memory_utilization", 0.5))
        if kw["tensor_parallel_size"] == 1:
            kw["distributed_executor_backend"] = "uni"
        if msg.get("speculative"):
            kw["speculative_config"] = msg["speculative"]
            kw["per_request_spec_decode_metrics"] = "detailed"  # per verify step: accepted, drafted
        if not msg.get("compile", True):  # eager: no torch.compile at start (quick starts for tests)
            kw["compilation_config"] = {"mode": 0}
        self.llm = LLM(**kw)
        import torch
        import transformers
        return {"ok": True, "vllm": vllm.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "python": sys.version.split()[0],
                "start_s": time.perf_counter() - t0}

    def counters(self) -> dict:
        from vllm.v1.metrics.reader import Counter, Vector

        out = {name: 0 for name in COUNTERS.values()}
        out["num_accepted_tokens_per_pos"] = []
        for m in self.llm.get_metrics():
            if isinstance(m, Counter) and m.name in COUNTERS:
                out[COUNTERS[m.name]] += int(m.value)
            elif isinstance(m, Vector) and m.name == PER_POS:
                pos = out["num_accepted_tokens_per_pos"]
                pos.extend([0] * (len(m.values) - len(pos)))
                for j, v in enumerate(m.values):
                    pos[j] += int(v)
        return out

    def generate(self, msg: dict) -> dict:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        before = self.counters()
        ids, state = [], {}
        for req in msg["requests"]:
            rid = str(self.next_id)
            self.next_id += 1
            temp = float(req.get("temperature", 0.0))
            params = SamplingParams(max_tokens=int(req["max_tokens"]), temperature=temp,
                                    top_p=1.0, top_k=0, seed=req.get("seed") if temp > 0 else None,
                                    stop_token_ids=list(req.get("stop_ids", [])), ignore_eos=False,
                                    skip_special_tokens=False, detokenize=False,
                                    output_kind=RequestOutputKind.DELTA)
            engine.add_request(rid, {"prompt_token_ids": list(req["prompt_ids"])}, params)
            ids.append(rid)
            state[rid] = dict(output_ids=[], emitted=[], step_s=[], wall_s=None, step_accepted=[],
                              step_drafted=[], finish_reason=None)
        t0 = last = time.perf_counter()
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            step_s, last = now - last, now
            for out in outs:
                s = state.get(out.request_id)
                if s is None:
                    continue
                comp = out.outputs[0]
                new = list(comp.token_ids)
                if new:
                    s["output_ids"].extend(new)
                    s["emitted"].append(len(new))
                    s["step_s"].append(step_s)
                if out.finished:
                    s["wall_s"] = time.perf_counter() - t0
                    s["finish_reason"] = comp.finish_reason
                    metrics = getattr(comp, "spec_decode_metrics", None)
                    if metrics is not None:
                        s["step_accepted"] = list(metrics.per_step_accepted)
                        s["step_drafted"] = list(metrics.per_step_drafted)
        wall = time.perf_counter() - t0
        after = self.counters()
        delta = {k: after[k] - before[k] for k in COUNTERS.values()}
        pos_a, pos_b = after["num_accepted_tokens_per_pos"], before["num_accepted_tokens_per_pos"]
        pos_b = pos_b + [0] * (len(pos_a) - len(pos_b))
        delta["num_accepted_tokens_per_pos"] = [a - b for a, b in zip(pos_a, pos_b)]
        return {"ok": True, "wall_s": wall, "counters": delta, "results": [state[r] for r in ids]}


def main() -> int:
    proto = _reply_channel()
    worker = Worker()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
            op = msg.get("op")
            if op == "stop":
                break
            if op == "start":
                reply = worker.start(msg)
            elif op == "generate":
                reply = worker.generate(msg)
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as err:  # any failure is reported to the client in one line; the worker lives on
            traceback.print_exc()
            text = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
            reply = {"ok": False, "error": f"{type(err).__name__}: {text}"}
        proto.write(json.dumps(reply, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":  # vLLM may start processes by spawn: keep the entry point behind the guard
    sys.exit(main())
