"""The one place where chat messages become prompt token ids (sampler and trainer both call it)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def content_text(content: Any) -> str:
    """A message's content as text: a string as is, the text (and refusal) parts of a part list
    joined with newlines; other parts (images, files) carry no text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, Mapping):
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str):
                texts.append(text)
    return "\n".join(texts)


def flatten_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """OpenAI chat messages (part lists, tool calls) as the role/content pairs every chat
    template understands: parts become text, an assistant's tool calls are appended as JSON."""
    flat = []
    for m in messages:
        text = content_text(m.get("content"))
        calls = m.get("tool_calls")
        if calls:
            text = "\n".join(filter(None, [text, json.dumps(
                [c.get("function", c) for c in calls], ensure_ascii=False, sort_keys=True)]))
        flat.append({"role": str(m.get("role", "user")), "content": text})
    return flat


def encode_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Apply the tokenizer's chat template with the generation prompt and return token ids.

    Rendering to text and then encoding without extra special tokens keeps the ids identical to
    what a server applying the same template (vLLM's chat endpoint) would see. Messages in the
    full OpenAI format are flattened first (``flatten_messages``).
    """
    text = tokenizer.apply_chat_template(flatten_messages(messages), tokenize=False,
                                         add_generation_prompt=True)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids
