"""One OpenTelemetry span with the GenAI semantic conventions → one trace item of ours (pure).

The conventions have changed shape three times, and instrumentations in the wild emit all three,
so a span's conversation is read from the first of these that it carries:

1. **JSON attributes** (semconv ≥ 1.36, ``opentelemetry-instrumentation-openai-v2`` with
   ``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`` and content capture
   ``span_only``): ``gen_ai.system_instructions``, ``gen_ai.input.messages``,
   ``gen_ai.output.messages`` — messages of typed parts (``text``, ``tool_call``,
   ``tool_call_response``, ``uri``), and ``gen_ai.tool.definitions``; the same attributes on a
   ``gen_ai.client.inference.operation.details`` event (content capture ``event_only``, where
   the event is a log record joined to its span);
2. **span events** (semconv 1.27–1.35 put on the span): ``gen_ai.system.message``,
   ``gen_ai.user.message``, ``gen_ai.assistant.message``, ``gen_ai.tool.message`` and
   ``gen_ai.choice``, their body in the event's attributes (or a JSON ``body`` attribute); also
   the older ``gen_ai.content.prompt`` / ``gen_ai.content.completion`` events;
3. **flat attributes** (OpenLLMetry and the first conventions): ``gen_ai.prompt.{i}.role``,
   ``.content``, ``.tool_call_id``, ``.tool_calls.{j}.{id,name,arguments}`` and the same under
   ``gen_ai.completion.{i}`` with ``.finish_reason``.

4. **Langfuse's attributes** (Langfuse v3+ SDKs, which export OTLP to
   ``/api/public/otel/v1/traces``): a span with ``langfuse.observation.type = generation``,
   ``langfuse.observation.input`` / ``.output`` (JSON, read as the Langfuse receiver reads a
   generation's input and output), ``.model.name``, ``.model.parameters``, ``.usage_details``;
   ``langfuse.observation.metadata.policy`` (or ``langfuse.trace.metadata.policy``) names the
   policy.

A GenAI span whose content was not captured (the instrumentations' default) still becomes a
trace, with an empty conversation and ``trainable=false`` (``content_not_captured``, or
``model_error`` when the call failed): the model, usage and outcomes are still worth keeping.
Spans without any ``gen_ai.*`` attribute, and GenAI spans that are not a model call (tools,
agents, embeddings), are not traces: the caller acknowledges and skips them.

``gen_ai.evaluation.result`` events on the span become outcomes (``gen_ai.evaluation.name``;
the value is ``gen_ai.evaluation.score.value``, else ``gen_ai.evaluation.score.label``).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from app.receivers.langfuse.service import messages_from, response_from, sampling_from, usage_from

CONTENT_NOT_CAPTURED = "content_not_captured"
POLICY_ATTRIBUTE = "tracelearn.policy"
"""The span (or resource) attribute naming the policy a span's model call belongs to."""

MODEL_CALLS = frozenset({"chat", "text_completion", "generate_content"})
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
DETAILS_EVENT = "gen_ai.client.inference.operation.details"
"""The latest conventions' one event per call, carrying the JSON-attribute shape (emitted as a
log record by util-genai's ``event_only`` / ``span_and_event`` content modes)."""
CONVERSATION_EVENTS = frozenset({"gen_ai.system.message", "gen_ai.user.message",
                                 "gen_ai.assistant.message", "gen_ai.tool.message",
                                 "gen_ai.choice", "gen_ai.evaluation.result", DETAILS_EVENT})
"""The GenAI events that may arrive as OTLP log records rather than on their span."""
_MESSAGE_EVENTS = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
                   "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
           "tool_call": "tool_calls", "content_filter": "content_filter",
           "function_call": "function_call"}
_SAMPLING = {"gen_ai.request.temperature": "temperature", "gen_ai.request.top_p": "top_p",
             "gen_ai.request.max_tokens": "max_tokens", "gen_ai.request.seed": "seed",
             "gen_ai.request.stop_sequences": "stop",
             "gen_ai.request.frequency_penalty": "frequency_penalty",
             "gen_ai.request.presence_penalty": "presence_penalty"}
LANGFUSE = "langfuse.observation."
_LANGFUSE_POLICY = ("langfuse.observation.metadata.policy", "langfuse.trace.metadata.policy")
_FLAT = re.compile(r"gen_ai\.(prompt|completion)\.(\d+)\.(.+)")
_FLAT_CALL = re.compile(r"tool_calls\.(\d+)\.(id|name|arguments)")


class SpanRejected(Exception):
    """The span is a model call but cannot be stored; the message says why."""


@dataclass(frozen=True)
class EventView:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class SpanView:
    """A span with its attributes (and its resource's) as plain JSON values."""

    trace_id: str  # hex, as OTLP/JSON and every tracing UI spell it
    span_id: str
    name: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: list[EventView]
    start_ns: int
    failed: bool

    @property
    def external_id(self) -> str:
        """Stable across re-exports, so a re-sent batch is a duplicate, not a new trace."""
        return f"otel-{self.trace_id}-{self.span_id}"

    def strings(self) -> dict[str, Any]:
        """Everything the client sent that could hold a string, for the hostile-string check."""
        return {"name": self.name, "attributes": self.attributes, "resource": self.resource,
                "events": [{"name": e.name, "attributes": e.attributes} for e in self.events]}


Conversation = tuple[list[dict[str, Any]], Any, str | None]
"""(messages, response or None, finish reason or None)."""


@dataclass(frozen=True)
class Evaluation:
    name: str
    value: bool | int | float | str
    labelled_at: datetime | None  # None: the event has no time (the arrival time is used)


@dataclass
class MappedSpan:
    """A model call: the trace item (its ``policy`` still to be resolved by the caller)."""

    item: dict[str, Any]
    policy_hint: str | None
    models: list[str]
    untrainable: str | None
    evaluations: list[Evaluation] = field(default_factory=list)


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        assert isinstance(kv, KeyValue)
        out[kv.key] = plain(kv.value)
    return out


def view(span: Span, resource: dict[str, Any]) -> SpanView:
    return SpanView(
        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), name=span.name,
        attributes=attributes(span.attributes), resource=resource,
        events=[EventView(e.name, e.time_unix_nano, attributes(e.attributes))
                for e in span.events],
        start_ns=span.start_time_unix_nano,
        failed=span.status.code == Status.STATUS_CODE_ERROR,
    )


def skip_reason(span: SpanView) -> str | None:
    """Why a span is not a model call (None: it is one)."""
    kind = span.attributes.get(LANGFUSE + "type")
    if kind is not None and not any(k.startswith("gen_ai.") for k in span.attributes):
        return None if kind == "generation" else f"a Langfuse {kind!r} observation"
    if not any(key.startswith("gen_ai.") for key in span.attributes):
        return "not a GenAI span"
    operation = span.attributes.get("gen_ai.operation.name")
    if operation is not None and operation not in MODEL_CALLS:
        return f"gen_ai.operation.name {operation!r} is not a model call"
    return None


def map_span(span: SpanView) -> MappedSpan:
    """The trace item for a model-call span; raises ``SpanRejected`` when it cannot be one."""
    conversation: Conversation | None = None
    if not any(k.startswith("gen_ai.") for k in span.attributes):
        span, conversation = _as_genai(span)
    attrs = span.attributes
    messages, response, finish = conversation or _conversation(span)
    untrainable = None
    if not messages or response is None:
        untrainable = "model_error" if span.failed else CONTENT_NOT_CAPTURED
    item: dict[str, Any] = {
        "external_id": span.external_id,
        "messages": messages or [{"role": "user", "content": ""}],
        "response": "" if response is None else response,
    }
    reasons = attrs.get("gen_ai.response.finish_reasons")
    if isinstance(reasons, list) and reasons and isinstance(reasons[0], str):
        finish = reasons[0]
    if finish in _FINISH:
        item["finish_reason"] = _FINISH[finish]
    models = [m for m in (attrs.get("gen_ai.response.model"), attrs.get("gen_ai.request.model"))
              if isinstance(m, str) and m]
    if models:
        item["model"] = models[0]
    sampling = {ours: attrs[theirs] for theirs, ours in _SAMPLING.items()
                if attrs.get(theirs) is not None}
    if sampling:
        item["sampling_params"] = sampling
    tools = _tools(content_attributes(span).get("gen_ai.tool.definitions"))
    if tools:
        item["tools"] = tools
    usage = _usage(attrs)
    if usage:
        item["usage"] = usage
    if span.start_ns:
        item["occurred_at"] = _time(span.start_ns).isoformat()
    item["metadata"] = {k: v for k, v in {
        "source": "otlp",
        "otel_trace_id": span.trace_id,
        "otel_span_id": span.span_id,
        "otel_span_name": span.name,
        "service_name": span.resource.get("service.name"),
        "gen_ai_provider": attrs.get("gen_ai.provider.name") or attrs.get("gen_ai.system"),
        "response_id": attrs.get("gen_ai.response.id"),
        "finish_reasons": reasons,
    }.items() if v is not None}
    hints = [attrs.get(POLICY_ATTRIBUTE), span.resource.get(POLICY_ATTRIBUTE),
             *(attrs.get(key) for key in _LANGFUSE_POLICY)]
    hint = next((h for h in hints if isinstance(h, str)), None)
    return MappedSpan(item=item, policy_hint=hint,
                      models=models, untrainable=untrainable,
                      evaluations=evaluations(span.events))


# ------------------------------------------------------------------ the conversation, four shapes

def _as_genai(span: SpanView) -> tuple[SpanView, Conversation]:
    """A Langfuse generation span in GenAI terms, and its conversation (Langfuse's input and
    output are OpenAI-shaped, not semconv messages)."""
    attrs = span.attributes
    source = {k: _json(attrs.get(LANGFUSE + k), LANGFUSE + k)
              for k in ("input", "output", "model.parameters", "usage_details")}
    converted: dict[str, Any] = {"gen_ai.operation.name": "chat"}
    if isinstance(attrs.get(LANGFUSE + "model.name"), str):
        converted["gen_ai.request.model"] = attrs[LANGFUSE + "model.name"]
    for key, value in sampling_from(source["model.parameters"]).items():
        theirs = next((t for t, ours in _SAMPLING.items() if ours == key), None)
        if theirs is not None:
            converted[theirs] = value
    usage = usage_from(source["usage_details"])
    if usage:
        converted["gen_ai.usage.input_tokens"] = usage["prompt_tokens"]
        converted["gen_ai.usage.output_tokens"] = usage["completion_tokens"]
    messages = messages_from(source["input"]) if source["input"] is not None else []
    if not isinstance(messages, list):
        raise SpanRejected("langfuse.observation.input is not a list of messages")
    output = response_from(source["output"]) if source["output"] is not None else None
    return SpanView(trace_id=span.trace_id, span_id=span.span_id, name=span.name,
                    attributes=attrs | converted, resource=span.resource, events=span.events,
                    start_ns=span.start_ns, failed=span.failed), (messages, output, None)

def content_attributes(span: SpanView) -> dict[str, Any]:
    """Where the JSON-attribute shape lives: the span, else its details event."""
    if _JSON_KEYS & span.attributes.keys():
        return span.attributes
    details = next((e for e in span.events if e.name == DETAILS_EVENT
                    and _JSON_KEYS & e.attributes.keys()), None)
    return details.attributes if details is not None else span.attributes


_JSON_KEYS = frozenset({"gen_ai.input.messages", "gen_ai.output.messages"})


def _conversation(span: SpanView) -> Conversation:
    attrs = content_attributes(span)
    if _JSON_KEYS & attrs.keys():
        return _from_json_attributes(attrs)
    if any(e.name in _MESSAGE_EVENTS or e.name in ("gen_ai.choice", "gen_ai.content.prompt",
                                                   "gen_ai.content.completion")
           for e in span.events):
        return _from_events(span.events)
    return _from_flat_attributes(attrs)


def _json(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise SpanRejected(f"{what} is not valid JSON") from exc


def _from_json_attributes(attrs: dict[str, Any]) -> Conversation:
    messages: list[dict[str, Any]] = []
    system = _json(attrs.get("gen_ai.system_instructions"), "gen_ai.system_instructions")
    if system:
        messages.append({"role": "system", "content": _parts_content(_list(system, "system"))})
    for message in _list(_json(attrs.get("gen_ai.input.messages"), "gen_ai.input.messages"),
                         "gen_ai.input.messages"):
        messages.extend(_from_parts_message(message))
    outputs = _list(_json(attrs.get("gen_ai.output.messages"), "gen_ai.output.messages"),
                    "gen_ai.output.messages")
    if not outputs:
        return messages, None, None
    first = outputs[0]
    produced = _from_parts_message(first)
    if len(produced) != 1 or produced[0]["role"] != "assistant":
        raise SpanRejected("gen_ai.output.messages[0] is not one assistant message")
    finish = first.get("finish_reason") if isinstance(first, dict) else None
    return messages, _response(produced[0]), finish if isinstance(finish, str) else None


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpanRejected(f"{what} must be a list")
    return value


def _from_parts_message(message: Any) -> list[dict[str, Any]]:
    """A semconv message (role + typed parts) as chat messages: tool results become one tool
    message each, since the chat format answers one tool call per message."""
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise SpanRejected(f"a message needs a role among {sorted(_ROLES)}")
    role = message["role"]
    parts = _list(message.get("parts"), "a message's parts")
    calls = [_call(p) for p in parts if isinstance(p, dict) and p.get("type") == "tool_call"]
    results = [p for p in parts if isinstance(p, dict) and p.get("type") == "tool_call_response"]
    if results:
        return [{"role": "tool", "tool_call_id": str(p.get("id") or ""),
                 "content": _text(p.get("response"))} for p in results]
    content_parts = [p for p in parts if not (isinstance(p, dict) and p.get("type") == "tool_call")]
    out: dict[str, Any] = {"role": role, "content": _parts_content(content_parts)}
    if calls:
        out["tool_calls"] = calls
        if not content_parts:
            out["content"] = None
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return [out]


def _parts_content(parts: list[Any]) -> str | list[dict[str, Any]]:
    converted = [_part(p) for p in parts]
    if all(p["type"] == "text" for p in converted) and len(converted) <= 1:
        return converted[0]["text"] if converted else ""
    return converted


def _part(part: Any) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return {"type": "text", "text": _text(part.get("content"))}
    if kind == "uri" and part.get("modality") == "image" and isinstance(part.get("uri"), str):
        return {"type": "image_url", "image_url": {"url": part["uri"]}}
    raise SpanRejected(f"message part type {kind!r} is not supported (text, tool_call, "
                       "tool_call_response and image uri parts are)")


def _call(part: dict[str, Any]) -> dict[str, Any]:
    name = part.get("name")
    if not isinstance(name, str) or not name:
        raise SpanRejected("a tool_call part needs a name")
    return {"id": str(part.get("id") or ""), "type": "function",
            "function": {"name": name, "arguments": _text(part.get("arguments", {}))}}


def _text(value: Any) -> str:
    """Text as given; structured values (tool arguments, results) as the JSON a model reads."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _response(message: dict[str, Any]) -> str | dict[str, Any]:
    """The answer as a string when it is text only, else as the message object."""
    if isinstance(message.get("content"), str) and not message.get("tool_calls"):
        return str(message["content"])
    return {k: v for k, v in message.items() if k in ("content", "tool_calls") and v is not None}


def _from_events(events: list[EventView]) -> Conversation:
    messages: list[dict[str, Any] | None] = []
    response: Any = None
    finish: str | None = None
    answered = False
    for event in events:
        body = _event_body(event)
        if event.name in _MESSAGE_EVENTS:
            messages.append(_chat_message(_MESSAGE_EVENTS[event.name], body))
        elif event.name == "gen_ai.choice" and not answered:
            answered = True
            message = _json(body.get("message"), "gen_ai.choice message")
            answer = _chat_message("assistant", message if isinstance(message, dict) else {})
            response = _response(answer) if answer is not None else None
            finish = body.get("finish_reason") if isinstance(body.get("finish_reason"),
                                                             str) else None
        elif event.name == "gen_ai.content.prompt":
            for m in _list(_json(event.attributes.get("gen_ai.prompt"), "gen_ai.prompt"),
                           "gen_ai.prompt"):
                messages.append(_chat_message(m.get("role", "user") if isinstance(m, dict)
                                              else "user", m if isinstance(m, dict) else {}))
        elif event.name == "gen_ai.content.completion" and not answered:
            answered = True
            choices = _list(_json(event.attributes.get("gen_ai.completion"),
                                  "gen_ai.completion"), "gen_ai.completion")
            answer = _chat_message("assistant", choices[0]) if choices and isinstance(
                choices[0], dict) else None
            response = _response(answer) if answer is not None else None
    if any(m is None for m in messages):
        return [], response, finish  # the instrumentation withheld the content
    return [m for m in messages if m is not None], response, finish


def _event_body(event: EventView) -> dict[str, Any]:
    body = _json(event.attributes.get("body"), f"{event.name} body")
    return body if isinstance(body, dict) else event.attributes


def _chat_message(default_role: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """An OpenAI-shaped message from an event body; None when the instrumentation withheld its
    content (no content, or tool calls without their arguments)."""
    role = body.get("role") if body.get("role") in _ROLES else default_role
    out: dict[str, Any] = {"role": role, "content": body.get("content")}
    calls = _list(_json(body.get("tool_calls"), "tool_calls"), "tool_calls")
    if any("arguments" not in _function(c) for c in calls):
        return None
    if calls:
        out["tool_calls"] = [_openai_call(c) for c in calls]
    elif out["content"] is None:
        return None
    tool_call_id = body.get("id", body.get("tool_call_id"))
    if role == "tool" and tool_call_id is not None:
        out["tool_call_id"] = str(tool_call_id)
    return out


def _function(call: Any) -> dict[str, Any]:
    """A tool call's function (OpenAI nests it; flat shapes do not)."""
    if not isinstance(call, dict):
        raise SpanRejected("a tool call must be an object")
    nested = call.get("function")
    return nested if isinstance(nested, dict) else call


def _openai_call(call: Any) -> dict[str, Any]:
    function = _function(call)
    return _call({"id": call.get("id"), "name": function.get("name"),
                  "arguments": function.get("arguments", {})})


def _from_flat_attributes(attrs: dict[str, Any]) -> Conversation:
    grouped: dict[str, dict[int, dict[str, Any]]] = {"prompt": {}, "completion": {}}
    for key, value in attrs.items():
        match = _FLAT.fullmatch(key)
        if match:
            grouped[match[1]].setdefault(int(match[2]), {})[match[3]] = value
    prompt = [_flat_message(fields, "user") for _, fields in sorted(grouped["prompt"].items())]
    messages = [m for m in prompt if m is not None] if None not in prompt else []
    completions = [fields for _, fields in sorted(grouped["completion"].items())]
    answer = _flat_message(completions[0], "assistant") if completions else None
    if answer is None:
        return messages, None, None
    finish = completions[0].get("finish_reason")
    return messages, _response(answer), finish if isinstance(finish, str) else None


def _flat_message(fields: dict[str, Any], default_role: str) -> dict[str, Any] | None:
    calls: dict[int, dict[str, Any]] = {}
    for key, value in fields.items():
        match = _FLAT_CALL.fullmatch(key)
        if match:
            calls.setdefault(int(match[1]), {})[match[2]] = value
    body: dict[str, Any] = {k: v for k, v in fields.items() if k in ("role", "content",
                                                                       "tool_call_id")}
    if calls:
        body["tool_calls"] = [calls[i] for i in sorted(calls)]
    return _chat_message(default_role, body)


# ---------------------------------------------------------------------- the rest of the span

def _tools(value: Any) -> list[dict[str, Any]]:
    definitions = _list(_json(value, "gen_ai.tool.definitions"), "gen_ai.tool.definitions")
    out = []
    for d in definitions:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise SpanRejected("a tool definition needs a name")
        function = {k: d[k] for k in ("name", "description", "parameters") if d.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _usage(attrs: dict[str, Any]) -> dict[str, int] | None:
    for prompt, completion in (("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"),
                               ("gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens")):
        p, c = attrs.get(prompt), attrs.get(completion)
        if isinstance(p, int) and isinstance(c, int):
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    return None


def _time(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def evaluations(events: list[EventView]) -> list[Evaluation]:
    return [e for e in map(_evaluation, events) if e is not None]


def _evaluation(event: EventView) -> Evaluation | None:
    if event.name != "gen_ai.evaluation.result":
        return None
    attrs = event.attributes
    name = attrs.get("gen_ai.evaluation.name")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise SpanRejected("a gen_ai.evaluation.result event needs gen_ai.evaluation.name "
                           "(at most 128 characters)")
    value = attrs.get("gen_ai.evaluation.score.value", attrs.get("gen_ai.evaluation.score.label"))
    if not isinstance(value, bool | int | float | str) or (
            isinstance(value, str) and len(value) > 256):
        raise SpanRejected(f"evaluation {name!r} needs gen_ai.evaluation.score.value (a number) "
                           "or gen_ai.evaluation.score.label (a short string)")
    return Evaluation(name=name, value=value,
                      labelled_at=_time(event.time_ns) if event.time_ns else None)
