"""OpenAI's fine-tuning JSONL ↔ our traces (pure): one line is one conversation whose last
message is the assistant's answer.

In: ``messages`` (the last one, from the assistant, becomes the response), ``tools``,
``parallel_tool_calls``; the assistant messages' ``weight`` (a fine-tuning setting, not part of
the chat format) is kept in ``metadata.openai_weights``. The external id is ``external_id`` under
the line's ``tracelearn`` key when it has one (our own export), else a hash of the line's
content, so importing a file twice finds every line already stored.

Out: the same shape, plus a ``tracelearn`` key with what the format has no place for (external id,
policy, split, outcomes, the graded rollout groups and their rewards). OpenAI's uploader wants
only the chat keys: ``--bare`` leaves ``tracelearn`` out.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from app.traces.schemas import TraceOut

KEY = "tracelearn"
_RESPONSE_KEYS = ("content", "tool_calls", "refusal")


class LineRejected(Exception):
    """The line cannot be a trace; the message says why."""


def external_id(record: dict[str, Any]) -> str:
    ours = record.get(KEY)
    if isinstance(ours, dict) and isinstance(ours.get("external_id"), str):
        return str(ours["external_id"])
    canonical = json.dumps({k: v for k, v in record.items() if k != KEY}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return "jsonl-" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def to_item(record: Any, policy: str | None) -> tuple[dict[str, Any], str | None]:
    """The trace item of one line and why it is not trainable (None: it is), as our export
    recorded it; ``policy``, when given, is the policy (else the one our export names)."""
    if not isinstance(record, dict):
        raise LineRejected("a line is a JSON object with `messages`")
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2 or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") != "assistant":
        raise LineRejected("`messages` needs at least two messages, the last from the assistant "
                           "(the answer)")
    found = record.get(KEY)
    ours: dict[str, Any] = found if isinstance(found, dict) else {}
    name = policy or ours.get("policy")
    if not isinstance(name, str):
        raise LineRejected("the line names no policy: pass --policy")
    weights = {i: m["weight"] for i, m in enumerate(messages)
               if isinstance(m, dict) and "weight" in m}
    *prompt, answer = [{k: v for k, v in m.items() if k != "weight"} if isinstance(m, dict) else m
                       for m in messages]
    # Our own export carries the metadata as stored: kept as is, a re-import is a duplicate.
    metadata = ours["metadata"] if isinstance(ours.get("metadata"), dict) else {
        "source": "openai-jsonl"}
    if weights:
        metadata = metadata | {"openai_weights": {str(i): w for i, w in weights.items()}}
    # Our export keeps a message-shaped response as stored (the chat line cannot tell
    # `{"content": "x"}` from "x").
    stored = ours.get("response")
    item: dict[str, Any] = {
        "external_id": external_id(record),
        "policy": name,
        "messages": prompt,
        "response": stored if isinstance(stored, dict) else _response(answer),
        "metadata": metadata,
    }
    for key in ("tools", "parallel_tool_calls"):
        if key in record:
            item[key] = record[key]
    for key in ("model", "finish_reason", "sampling_params", "usage", "tool_choice", "tags",
                "user_id", "session_id", "occurred_at"):
        if ours.get(key) is not None:
            item[key] = ours[key]
    outcomes = ours.get("outcomes")
    if isinstance(outcomes, list) and outcomes and isinstance(outcomes[0], dict):
        item["outcome"] = {k: outcomes[0][k] for k in ("name", "value") if k in outcomes[0]}
    reason = ours.get("untrainable_reason")
    return item, reason if isinstance(reason, str) else None


def _response(answer: dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(answer.get("content"), str) and not answer.get("tool_calls") \
            and answer.get("refusal") is None:
        return str(answer["content"])
    return {k: answer[k] for k in _RESPONSE_KEYS if answer.get(k) is not None}


def from_trace(trace: TraceOut, groups: list[dict[str, Any]], bare: bool) -> dict[str, Any]:
    response = trace.response
    answer = ({"role": "assistant", "content": response} if isinstance(response, str)
              else {"role": "assistant", **{k: v for k, v in response.items() if k != "role"}})
    line: dict[str, Any] = {"messages": [*trace.messages, answer]}
    if trace.tools is not None:
        line["tools"] = trace.tools
    if trace.parallel_tool_calls is not None:
        line["parallel_tool_calls"] = trace.parallel_tool_calls
    if bare:
        return line
    extra = trace.model_dump(mode="json", include={
        "external_id", "policy", "model", "finish_reason", "sampling_params", "usage",
        "tool_choice", "tags", "user_id", "session_id", "occurred_at", "split", "trainable",
        "untrainable_reason", "metadata"}, exclude_none=True)
    extra["outcomes"] = [{"name": o.name, "value": o.value, "source": o.source.value,
                          "origin": o.origin.value} for o in trace.outcomes]
    extra["groups"] = groups
    if not isinstance(response, str):
        extra["response"] = response
    line[KEY] = extra
    return line
