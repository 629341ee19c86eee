"""The one place where chat messages become prompt token ids (sampler and trainer both call it)."""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Apply the tokenizer's chat template with the generation prompt and return token ids.

    Rendering to text and then encoding without extra special tokens keeps the ids identical to
    what a server applying the same template (vLLM's chat endpoint) would see.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids
