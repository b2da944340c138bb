"""A target's chat template and stop tokens: how a conversation becomes prompt ids."""

from __future__ import annotations


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids the target is prompted with: the chat template with a generation prompt, or the turns
    joined by blank lines for a tokenizer without a template (a base model)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return tokenizer(text)["input_ids"]


def eos_ids(target) -> set[int]:
    """Token ids that end a turn: the generation config's and the tokenizer's EOS."""
    ids = set()
    gen = getattr(getattr(target, "hf_model", None) or getattr(target, "model", None), "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(target.tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids
