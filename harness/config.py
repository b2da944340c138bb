"""Run configuration: one dataclass with commented defaults, plus named presets. The CLI fills it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RunConfig:
    target: str = "smollm2-135m"  # preset name, model folder, .gguf path or hub id
    backend: str = "auto"  # native | hf | auto (the preset's default)
    drafters: tuple[str, ...] = ("ar", "ngram", "layerskip")  # ar always runs first: it is the baseline
    suite: str = "mini"  # mini | humaneval | calibration | path to a question.jsonl
    limit: int | None = None  # at most this many prompts
    per_category: int | None = None  # at most this many prompts per category
    max_new_tokens: int = 128  # per turn
    temperature: float = 0.0  # 0 = greedy
    k: int = 5  # draft tokens per step (chains)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    max_len: int = 2048  # KV cache slots per sequence
    device_map: str | None = None  # "auto": spread the target over the visible GPUs (and CPU) with accelerate (hf backend)
    out: str = "results"  # parent folder of the run folder
    run_id: str | None = None  # default: <target>-<suite>-<timestamp>
    resume: bool = False  # skip prompts already finished in an existing run folder
    overwrite: bool = False  # replace an existing run folder
    verify_backend: str = "auto"  # triton | torch | auto (triton on CUDA)
    meter: bool = True  # information-surplus meter on/off
    meter_base: str | None = None  # n-gram base for the meter (default: the one shipped for the target, if any)
    layerskip_layers: int | None = None  # default: a third of the target's layers
    skip_layers: str | None = None  # selfspec: auto (search now) | search.json | comma-separated layers
    suffix_max_nodes: int = 10  # suffix: draft nodes per step at most
    suffix_alpha: float = 4.0  # suffix: node budget per matched token (SuffixDecoding's max_spec = alpha * match)
    suffix_corpus: str | None = None  # suffix: a .txt / .jsonl corpus added to the global suffix trie
    suffix_verify_cost: str | None = None  # suffix: "A,B", verify of 1+n tokens = 1+A+B*n forwards (default 0.05,0.055)
    draft_model: str | None = None  # for the `model` drafter: preset, folder, .gguf or hub id
    head: str | None = None  # for eagle drafters: head folder (default: the one shipped for the target)
    depth: int | None = None  # eagle trees: draft depth
    top_k: int | None = None  # eagle trees: children per expanded node
    total_tokens: int | None = None  # eagle trees: nodes verified per step
    head_dtype: str | None = None  # eagle, eagle3 on a CPU: float32 | bfloat16, the dtype the head drafts in (default: the target's)
    stop_below: float = 0.0  # eagle chains: a row drafts on while its chain's draft probability (next draft's best) >= this (0: K always)
    warmup: int = 1  # warm-up prompts per drafter before timing (not recorded)
    batch_size: int = 1
    fast: bool | None = None  # CUDA graphs on the native backend (default: on for CUDA)
    fast_mode: str = "graph"  # graph | compile: what the graphs capture, eager or torch.compile'd layers
    command: str = ""  # the exact command line, recorded in env.json
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


HEAD_DTYPES = ("float32", "bfloat16")  # head_dtype's choices (eagle, eagle3 on a CPU)


PRESETS: dict[str, dict] = {
    # `make bench` on 2 CPU cores: every drafter on SmolLM2, two mini prompts per category
    "bench-cpu": dict(suite="mini", per_category=2, max_new_tokens=64,
                      drafters=("ar", "ngram", "suffix", "layerskip", "eagle", "eagle3:k=2", "hf-generate", "hf-prompt-lookup")),
    # issue 15's suffix and self-speculation figures on 2 CPU cores: the prompts of bench-cpu, the global suffix
    # trie warmed with SmolLM2's answers to other prompts (harness/suites/suffix_corpus_smollm2.jsonl)
    "suffix-cpu": dict(suite="mini", per_category=2, max_new_tokens=64, k=5, suffix_corpus="smollm2",
                       drafters=("ar", "ngram", "suffix", "selfspec")),
    # `make bench`'s second run (issue 14): the shipped eagle3 head's best chain and tree against ar on MT-bench,
    # one question per category, both turns, fp32 target, greedy; the meter off (a drafter-only comparison). The
    # chain of 2 with the head in fp32 and in bf16 (head_dtype: a CPU option, its products cost about half)
    "bench-mtbench-cpu": dict(suite="mt-bench", per_category=1, max_new_tokens=64, dtype="float32", meter=False,
                              drafters=("ar", "eagle3:k=2:total_tokens=0", "eagle3:k=2:total_tokens=0:head_dtype=bfloat16",
                                        "eagle3:depth=3:top_k=2:total_tokens=4:head_dtype=bfloat16")),
    # EAGLE heads on MT-bench (two turns) on a CPU: the shipped eagle3 head against ar and eagle
    "mtbench-cpu": dict(suite="mt-bench", per_category=2, max_new_tokens=128, drafters=("ar", "eagle", "eagle3")),
    # the GPU comparison of the core issue
    "humaneval-gpu": dict(suite="humaneval", max_new_tokens=256,
                          drafters=("ar", "ngram", "layerskip", "hf-generate", "hf-prompt-lookup")),
}
