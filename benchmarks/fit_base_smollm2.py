"""Fits the information-surplus meter's n-gram base predictor for SmolLM2 on target-generated text:
the answers (after the last `<|im_start|>assistant` header) of the self-distillation data that trained
the shipped EAGLE head (harness/heads/smollm2-135m-eagle/generated.jsonl: stdlib-derived prompts, disjoint
from every suite). Writes harness/heads/smollm2-135m.ngram.safetensors.

    python benchmarks/fit_base_smollm2.py
"""

from pathlib import Path

from harness.meter.ngram_base import NgramBase, read_id_sequences

HEADS = Path(__file__).resolve().parents[1] / "harness" / "heads"
IM_START = 1  # <|im_start|> in SmolLM2's vocabulary; the header is <|im_start|> assistant \n


def answers(seqs: list[list[int]]) -> list[list[int]]:
    out = []
    for ids in seqs:
        start = len(ids) - 1 - ids[::-1].index(IM_START) + 3 if IM_START in ids else 0
        if start < len(ids):
            out.append(ids[start:])
    return out


def main() -> None:
    seqs = answers(read_id_sequences(HEADS / "smollm2-135m-eagle" / "generated.jsonl"))
    base = NgramBase.fit(seqs, order=3, vocab_size=49152)
    base.save(HEADS / "smollm2-135m.ngram.safetensors")
    print(f"fitted on {len(seqs)} answers, {sum(map(len, seqs))} tokens")


if __name__ == "__main__":
    main()
