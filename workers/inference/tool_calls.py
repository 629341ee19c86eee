"""Tool calls in a generated answer, split off the way OpenAI's API returns them: the message's
text (or none) and a list of function calls with their arguments as JSON text.

Two shapes are recognised, the ones a model is asked for:

* the whole answer (optionally in a ```` ``` ```` fence) is one call or a JSON list of calls,
  ``{"name": ..., "arguments": {...}}`` or OpenAI's ``{"type": "function", "function": {...}}`` —
  what ``chat.tools_block`` asks a model whose template has no tools support for;
* ``<tool_call>{...}</tool_call>`` blocks (Hermes, Qwen 2.5 and other tool-trained templates;
  vLLM's ``hermes`` parser), with the text around them as the message's content.

All or nothing: when one call does not parse as JSON, names a function the request did not offer
or has arguments that are not an object, the whole answer stays text, as vLLM's parsers leave it.
The grader (``workers.graders.tool_call``) is more lenient on purpose — it scores attempts found
anywhere in prose — but here a false positive would turn an ordinary answer into a function call
the client goes and executes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)",
                    re.DOTALL)
_FENCE = re.compile(r"\A```[A-Za-z]*\s*(.*?)\s*```\Z", re.DOTALL)
# A whole-answer call starts with one of these; an answer that does may still be a call until
# it is complete (``ToolCallGate``).
_JSON_START = ("{", "[", "`")


class MalformedCall(ValueError):
    """A tool-call shape whose content is not a valid call to an offered function."""


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str
    """The arguments object as JSON text, as OpenAI's ``function.arguments``."""


@dataclass(frozen=True)
class ParsedAnswer:
    content: str | None
    """The answer's text without the calls (None when only whitespace is left); the whole text,
    unchanged, when it holds no calls."""
    calls: tuple[ParsedCall, ...] = ()


def _arguments(raw: Any) -> str:
    if raw is None:
        return "{}"
    if isinstance(raw, str):  # some models write the arguments as JSON text, as OpenAI sends them
        try:
            value = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise MalformedCall(f"arguments are not JSON: {raw[:80]!r}") from exc
        if not isinstance(value, dict):
            raise MalformedCall("arguments are not an object")
        return raw if raw.strip() else "{}"
    if not isinstance(raw, dict):
        raise MalformedCall("arguments are not an object")
    return json.dumps(raw, ensure_ascii=False)


def _call(value: Any, tool_names: Collection[str]) -> ParsedCall:
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise MalformedCall("not a call: no function name")
    if value["name"] not in tool_names:
        raise MalformedCall(f"{value['name']!r} is not one of the request's tools")
    return ParsedCall(value["name"], _arguments(value.get("arguments", value.get("parameters"))))


def _calls(value: Any, tool_names: Collection[str]) -> list[ParsedCall]:
    if isinstance(value, list):
        if not value:
            raise MalformedCall("an empty list of calls")
        return [_call(v, tool_names) for v in value]
    return [_call(value, tool_names)]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise MalformedCall(f"not JSON: {text[:80]!r}") from exc


def _whole_answer(text: str, tool_names: Collection[str]) -> list[ParsedCall]:
    body = text.strip()
    fenced = _FENCE.match(body)
    return _calls(_json(fenced.group(1) if fenced else body), tool_names)


def _blocks(text: str, tool_names: Collection[str]) -> ParsedAnswer:
    calls: list[ParsedCall] = []
    outside: list[str] = []
    pos = 0
    for block in _BLOCK.finditer(text):
        outside.append(text[pos:block.start()])
        calls.extend(_calls(_json(block.group(1).strip()), tool_names))
        pos = block.end()
    outside.append(text[pos:])
    # The text before the first call as written; what follows a call only when it says
    # something (not the newlines between blocks).
    content = (outside[0] + "".join(s for s in outside[1:] if s.strip())).rstrip()
    return ParsedAnswer(content if content.strip() else None, tuple(calls))


def split_tool_calls(text: str, tool_names: Collection[str]) -> ParsedAnswer:
    """``text`` as a message: its tool calls split off, or ``ParsedAnswer(text)`` unchanged when
    it holds none (or a malformed one)."""
    try:
        if CALL_OPEN in text:
            return _blocks(text, tool_names)
        if text.lstrip().startswith(_JSON_START):
            return ParsedAnswer(None, tuple(_whole_answer(text, tool_names)))
    except MalformedCall:
        pass
    return ParsedAnswer(text)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallGate:
    """Streams an answer while it may still turn out to hold tool calls: passes on text that can
    only be content and holds back what could begin a call, until the answer is complete.

    Held back: everything while the answer is blank or starts like a whole-answer call (``{``,
    ``[``, a fence); from a ``<tool_call>`` (or a beginning of one at the end) on; and trailing
    whitespace, which the message's content drops when calls follow. So what has been passed on
    is always the beginning of the final content, calls or not (``finish``).
    """

    def __init__(self, tool_names: Collection[str]) -> None:
        self.tool_names = tool_names
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        """Add generated text; returns the part that can be sent as content now."""
        self.text += delta
        if self.sent == 0 and (not self.text.strip() or self.text.lstrip().startswith(_JSON_START)):
            return ""
        start = self.text.find(CALL_OPEN, self.sent)
        end = start if start >= 0 else len(self.text) - _partial_suffix(self.text, CALL_OPEN)
        end = max(self.sent, len(self.text[:end].rstrip()))
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, tuple[ParsedCall, ...]]:
        """The rest of the content to send, and the calls, once the answer is complete."""
        parsed = split_tool_calls(self.text, self.tool_names)
        sent = self.text[:self.sent]
        if parsed.calls and (parsed.content or "").startswith(sent):
            return (parsed.content or "")[len(sent):], parsed.calls
        return self.text[self.sent:], ()
