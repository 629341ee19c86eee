"""The one place where chat messages become prompt token ids (sampler and trainer both call it)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

# The role of the prompt entry that carries the request's tool definitions (``with_tools``).
TOOLS_ROLE = "tools"


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
    template understands: parts become text, an assistant's tool calls are appended as JSON.
    A prompt's tools entry (``with_tools``) is not a message and is left out."""
    flat = []
    for m in messages:
        if m.get("role") == TOOLS_ROLE:
            continue
        text = content_text(m.get("content"))
        calls = m.get("tool_calls")
        if calls:
            text = "\n".join(filter(None, [text, json.dumps(
                [c.get("function", c) for c in calls], ensure_ascii=False, sort_keys=True)]))
        flat.append({"role": str(m.get("role", "user")), "content": text})
    return flat


def with_tools(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """A trace's prompt as the sampler and the trainer receive it: its messages, preceded by a
    ``{"role": "tools", "tools": [...]}`` entry when the request defined tools.

    The tools ride inside the prompt (not as a separate argument) so every backend, every copy
    and every JSON round trip carries them unchanged to ``encode_prompt``, which takes them out.
    """
    prompt = [dict(m) for m in messages]
    if tools:
        prompt.insert(0, {"role": TOOLS_ROLE, "tools": [dict(t) for t in tools]})
    return prompt


def split_tools(
    prompt: Sequence[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], list[dict[str, Any]]]:
    """The messages and the tool definitions of a prompt built by ``with_tools``."""
    tools: list[dict[str, Any]] = []
    messages = []
    for m in prompt:
        if m.get("role") == TOOLS_ROLE:
            tools.extend(dict(t) for t in m.get("tools") or [])
        else:
            messages.append(m)
    return messages, tools


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` variable. Transformers has no
    API for this; a template that never names ``tools`` silently drops them, so that is the test."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the one apply_chat_template uses with tools
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template


def tools_block(tools: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The fallback for a template without tools support: one system message listing the tool
    definitions as JSON (sorted keys, so the same tools always give the same tokens) and how a
    call is written — the same JSON shape ``flatten_messages`` gives an assistant's tool calls."""
    listing = json.dumps([t.get("function", t) for t in tools], ensure_ascii=False, sort_keys=True)
    return {
        "role": "system",
        "content": "Tools you may call, as JSON; to call them answer with a JSON list of "
        '{"name": ..., "arguments": ...}:\n' + listing,
    }


def _structured(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template with tools support: text content, tool calls kept as structures
    with their JSON arguments parsed (templates render ``arguments`` as a mapping)."""
    out: list[dict[str, Any]] = []
    for m, flat in zip(messages, flatten_messages(messages), strict=True):
        msg: dict[str, Any] = {"role": flat["role"], "content": content_text(m.get("content"))}
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function", c))
                # Not JSON (or already a mapping): rendered as given.
                with contextlib.suppress(TypeError, ValueError):
                    fn["arguments"] = json.loads(fn.get("arguments") or "{}")
                calls.append({"type": "function", "id": c.get("id"), "function": fn})
            msg["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    return out


def render_prompt(tokenizer: Any, prompt: Sequence[Mapping[str, Any]]) -> str:
    """The prompt text: the chat template with the generation prompt. Tool definitions go to the
    template's ``tools`` when it has them, else into ``tools_block``; tool calls and results then
    follow ``flatten_messages``."""
    messages, tools = split_tools(prompt)
    if tools and template_supports_tools(tokenizer):
        text: str = tokenizer.apply_chat_template(
            _structured(messages), tools=tools, tokenize=False, add_generation_prompt=True)
        return text
    flat = flatten_messages(messages)
    if tools:
        flat.insert(0, tools_block(tools))
    text = tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    return text


def encode_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Apply the tokenizer's chat template with the generation prompt and return token ids.

    Rendering to text and then encoding without extra special tokens keeps the ids identical to
    what a server applying the same template (vLLM's chat endpoint) would see. Messages in the
    full OpenAI format are flattened first (``flatten_messages``); a tools entry (``with_tools``)
    is rendered by ``render_prompt``.
    """
    ids: list[int] = tokenizer(render_prompt(tokenizer, messages),
                               add_special_tokens=False)["input_ids"]
    return ids
