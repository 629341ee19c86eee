"""The one place where chat messages become prompt token ids (sampler and trainer both call it)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple


class TokenOutOfVocabError(ValueError):
    """A token id the model has no embedding row for: the tokenizer and the model disagree."""


class _Special(NamedTuple):
    id: int
    lstrip: bool
    rstrip: bool

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


TEMPLATE_ROLES = {"developer": "system"}
"""OpenAI's ``developer`` role is what chat templates call ``system`` (they know no other)."""


def flatten_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """OpenAI chat messages (part lists, tool calls) as the role/content pairs every chat
    template understands: parts become text, an assistant's tool calls are appended as JSON,
    ``developer`` is ``system`` (``TEMPLATE_ROLES``). A prompt's tools entry (``with_tools``) is
    not a message and is left out. Every backend renders prompts through here, so a stored
    trace is regenerated from the very prompt the proxy served."""
    flat = []
    for m in messages:
        if m.get("role") == TOOLS_ROLE:
            continue
        text = content_text(m.get("content"))
        calls = m.get("tool_calls")
        if calls:
            text = "\n".join(filter(None, [text, json.dumps(
                [c.get("function", c) for c in calls], ensure_ascii=False, sort_keys=True)]))
        role = str(m.get("role", "user"))
        flat.append({"role": TEMPLATE_ROLES.get(role, role), "content": text})
    return flat


def _special_tokens(tokenizer: Any) -> dict[str, _Special]:
    """The tokenizer's special added tokens (turn markers, end of text), by their text."""
    out = {}
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            out[str(tok)] = _Special(int(tid), bool(tok.lstrip), bool(tok.rstrip))
    return out


def _stand_ins(specials: Iterable[str], texts: Iterable[str]) -> dict[str, str]:
    """One private-use character per special token, none of them occurring in ``texts``."""
    seen = set("".join(texts))
    free = (c for c in map(chr, range(0xF0000, 0x10FFFE)) if c not in seen)
    return {s: next(free) for s in specials}


def with_tools(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A trace's prompt as the sampler and the trainer receive it: its messages, preceded by a
    ``{"role": "tools", "tools": [...]}`` entry when the request defined tools (with the
    request's ``tool_choice``, when given, for a serving engine that parses calls itself).

    The tools ride inside the prompt (not as a separate argument) so every backend, every copy
    and every JSON round trip carries them unchanged to ``encode_prompt``, which takes them out.
    """
    prompt = [dict(m) for m in messages]
    if tools:
        entry: dict[str, Any] = {"role": TOOLS_ROLE, "tools": [dict(t) for t in tools]}
        if tool_choice is not None:
            entry["tool_choice"] = tool_choice
        prompt.insert(0, entry)
    return prompt


def tool_choice_of(prompt: Sequence[Mapping[str, Any]]) -> str | Mapping[str, Any] | None:
    """The ``tool_choice`` a prompt built by ``with_tools`` carries, if any."""
    for m in prompt:
        if m.get("role") == TOOLS_ROLE:
            choice: str | Mapping[str, Any] | None = m.get("tool_choice")
            return choice
    return None


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

    Message content is customer text (traces): a literal ``<|im_end|>`` or ``<|endoftext|>`` in
    it is encoded as those characters, never as the special token, so a trace cannot inject a
    turn boundary into what is sampled and trained on, nor reach an id the tokenizer invented
    past the model's embedding. Only the special tokens the template itself writes are special.
    For content without special-token text the ids are those of encoding the rendered template
    in one piece (what vLLM's chat endpoint sees). Messages in the full OpenAI format are
    flattened first (``flatten_messages``); a tools entry (``with_tools``) is rendered by
    ``render_prompt`` (tool definitions are customer text too, and are escaped the same way).
    """
    specials = _special_tokens(tokenizer)
    if not specials:
        plain: list[int] = tokenizer(render_prompt(tokenizer, messages),
                                     add_special_tokens=False)["input_ids"]
        return plain
    # Longest first: at one position the longest special wins, as in the tokenizer itself.
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    stand_in = _stand_ins(specials, _strings(messages))
    back = {c: s for s, c in stand_in.items()}
    escaped = _map_strings(messages, lambda t: pattern.sub(lambda h: stand_in[h.group()], t))
    text = render_prompt(tokenizer, escaped)
    restore = re.compile("|".join(map(re.escape, back)))

    def plain_ids(piece: str) -> list[int]:
        if not piece:
            return []
        piece = restore.sub(lambda h: back[h.group()], piece)
        encoded: list[int] = tokenizer(piece, add_special_tokens=False,
                                       split_special_tokens=True)["input_ids"]
        return encoded

    ids: list[int] = []
    pos, pending = 0, False  # pending: the last special strips whitespace to its right
    for hit in pattern.finditer(text):
        special = specials[hit.group()]
        piece = text[pos:hit.start()]
        if pending:
            piece = piece.lstrip()
        if special.lstrip:
            piece = piece.rstrip()
        ids += plain_ids(piece)
        ids.append(special.id)
        pos, pending = hit.end(), special.rstrip
    tail = text[pos:]
    ids += plain_ids(tail.lstrip() if pending else tail)
    return ids


def _strings(value: Any) -> Iterator[str]:
    """Every string in a prompt (message fields, tool definitions), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, Sequence):
        for v in value:
            yield from _strings(v)


def _map_strings(value: Any, f: Callable[[str], str]) -> Any:
    """``value`` with ``f`` applied to every string in it (mappings and lists copied)."""
    if isinstance(value, str):
        return f(value)
    if isinstance(value, Mapping):
        return {k: _map_strings(v, f) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_map_strings(v, f) for v in value]
    return value


def embedding_rows(model: Any) -> int:
    """How many token ids a transformers (or peft) model has embedding rows for."""
    return int(model.get_input_embeddings().num_embeddings)


def check_token_ids(sequences: Iterable[Sequence[int]], embedding_rows: int) -> None:
    """Raise ``TokenOutOfVocabError`` for an id without an embedding row, before the model turns
    it into an opaque index error (or a device-side assert on a GPU)."""
    for seq in sequences:
        bad = [t for t in seq if not 0 <= t < embedding_rows]
        if bad:
            raise TokenOutOfVocabError(
                f"token id {bad[0]} is outside the model's {embedding_rows}-row embedding: the "
                "tokenizer and the model disagree on the vocabulary")
