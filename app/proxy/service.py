"""The logging proxy: a chat request naming a policy is answered by that policy's serving snapshot
through the serving engine, and the exchange is ingested as a trace that records which snapshot
served it — how a customer gets traces in without writing any code.

The completion id doubles as the trace's ``external_id``, so outcomes can be posted later to
``/v1/feedback`` with the id the client already holds. A client-chosen id
(``X-Tracelearn-External-Id``) works as an idempotency key: a retry with the same request gets
the stored answer back (streamed too); the same id with another request is a 409.

What the engine does not do, the proxy does around it, so both modes agree: stop strings cut the
text (``finish_reason: stop``), a cut at ``max_tokens`` drops a dangling partial UTF-8 character
and says ``length``. A stream is generated whole and then sent in chunks, so its finish reason
and usage are known before the last chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from prometheus_client import Counter
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.service import Principal
from app.db import get_database
from app.engines import engine_for
from app.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from app.models import Trace
from app.observability import REGISTRY
from app.policies.service import get_policy, list_policies, sampling_params
from app.proxy.schemas import (
    ChatCompletionIn,
    ChatCompletionOut,
    Choice,
    ChoiceMessage,
    ModelList,
    ModelOut,
    Usage,
)
from app.settings import Settings
from app.snapshots.promotion import PromotionError, verify_adapter
from app.traces import service as traces
from app.traces.schemas import RefusalPart, TextPart
from app.traces.strings import describe, string_problems
from workers.inference.base import SamplingParams, UnknownAdapterError
from workers.inference.chat import with_tools
from workers.inference.serving import (
    EngineCompletion,
    EngineError,
    EngineUnavailable,
    ServingEngine,
)

log = logging.getLogger(__name__)

STREAMS_ABORTED = Counter(
    "tracelearn_proxy_streams_aborted_total",
    "Streamed completions the client disconnected from before the end (recorded, untrainable).",
    registry=REGISTRY,
)
TRACES_UNRECORDED = Counter(
    "tracelearn_proxy_traces_unrecorded_total",
    "Answered exchanges that could not be stored as a trace, by reason (the ingest status, or "
    "`error` when storing raised); each is also logged with its completion id.",
    ["reason"],
    registry=REGISTRY,
)
FINGERPRINT_KEY = "proxy_request_sha256"
_MAX_STOP = 4


# ---------------------------------------------------------------- models


def _model_out(policy: Any) -> ModelOut:
    serving = policy.serving_snapshot
    return ModelOut(
        id=policy.name,
        created=int(policy.created_at.timestamp()),
        owned_by=policy.tenant,
        serving_snapshot=serving.served_name if serving else None,
    )


def models(session: Session, principal: Principal) -> ModelList:
    return ModelList(data=[_model_out(p) for p in list_policies(session, principal.tenant)])


def model(session: Session, principal: Principal, model_id: str) -> ModelOut:
    return _model_out(_policy(session, principal, model_id))


def _policy(session: Session, principal: Principal, name: str) -> Any:
    try:
        return get_policy(session, principal.tenant, name)
    except NotFound as exc:
        raise NotFound(f"The model {name!r} does not exist", param="model",
                       code="model_not_found") from exc


# ---------------------------------------------------------------- requests


def refuse_unsupported(body: ChatCompletionIn) -> None:
    """Refuse, naming the parameter, what the proxy would otherwise have to ignore silently."""
    if body.n not in (None, 1):
        raise InvalidInput("only n=1 is supported: send one request per choice", param="n")
    if body.logprobs or body.top_logprobs:
        param = "logprobs" if body.logprobs else "top_logprobs"
        raise InvalidInput("logprobs are not returned by this proxy", param=param)
    if body.stream_options is not None and not body.stream:
        raise InvalidInput("stream_options is only allowed when stream is true",
                           param="stream_options")
    if isinstance(body.stop, list) and len(body.stop) > _MAX_STOP:
        raise InvalidInput(f"stop takes at most {_MAX_STOP} strings", param="stop")
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list) and any(p.type not in ("text", "refusal")
                                               for p in m.content):
            raise InvalidInput("this model accepts text only; image, audio and file parts "
                               "are not supported", param=f"messages.[{i}].content")


def refuse_hostile_strings(body: ChatCompletionIn, completion_id: str | None = None) -> None:
    """Every string of the request (metadata keys included) passes the check ingest applies,
    here, before generation: a request whose trace could not be stored is refused, not answered
    and then lost."""
    problems = string_problems(body.model_dump(mode="python", exclude_none=True))
    if completion_id is not None:
        problems += string_problems(completion_id, ("X-Tracelearn-External-Id",))
    if problems:
        loc = problems[0]["loc"]
        raise InvalidInput(describe(problems), param=".".join(loc) or None,
                           code=problems[0]["type"])


def engine_messages(body: ChatCompletionIn) -> list[dict[str, Any]]:
    """The messages as a text-only chat template expects them: parts joined to one string,
    ``developer`` as ``system``; tool calls and ids kept for templates that render them."""
    out = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text if isinstance(p, TextPart) else
                              p.refusal if isinstance(p, RefusalPart) else "" for p in content)
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role, "content": content or "",
        }
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump(mode="json") for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.name:
            message["name"] = m.name
        out.append(message)
    return out


def _stops(body: ChatCompletionIn) -> tuple[str, ...]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    return tuple(s for s in stop if s)


@dataclass(frozen=True)
class Route:
    """Where one request goes, resolved inside the request's transaction."""

    policy: str
    served_name: str
    adapter_path: str | None
    adapter_sha256: str | None
    engine: ServingEngine
    params: SamplingParams
    stop: tuple[str, ...]
    body: ChatCompletionIn
    completion_id: str
    client_chose_id: bool

    @property
    def model(self) -> str | None:
        return self.served_name if self.adapter_path else None

    def stored_sampling(self) -> dict[str, Any]:
        """What generation used, stored with the trace."""
        out: dict[str, Any] = {"max_tokens": self.params.max_tokens,
                               "temperature": self.params.temperature}
        if self.params.seed is not None:
            out["seed"] = self.params.seed
        if self.body.stop is not None:
            out["stop"] = self.body.stop
        return out

    def fingerprint(self) -> str:
        """Identifies the request for idempotent retries: same id + same fingerprint = replay."""
        b = self.body
        canonical = {
            "policy": self.policy,
            "messages": [m.model_dump(mode="json", exclude_none=True) for m in b.messages],
            "tools": [t.model_dump(mode="json", exclude_none=True) for t in b.tools or []],
            "tool_choice": b.tool_choice,
            "sampling_params": self.stored_sampling(),
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()


def resolve(
    session: Session, principal: Principal, body: ChatCompletionIn, settings: Settings,
    completion_id: str | None = None,
) -> Route:
    refuse_unsupported(body)
    refuse_hostile_strings(body, completion_id)
    policy = _policy(session, principal, body.model)
    serving = policy.serving_snapshot
    if serving is None:
        raise ServiceUnavailable(f"policy {policy.name!r} has no serving snapshot")
    params = sampling_params(policy, seed=body.seed, temperature=body.temperature,
                             max_tokens=body.max_completion_tokens or body.max_tokens)
    return Route(
        policy=policy.name,
        served_name=serving.served_name,
        adapter_path=serving.adapter_path,
        adapter_sha256=serving.adapter_sha256,
        engine=engine_for(settings, policy.base_model),
        params=params,
        stop=_stops(body),
        body=body,
        completion_id=completion_id or f"chatcmpl-{uuid.uuid4().hex}",
        client_chose_id=completion_id is not None,
    )


# ---------------------------------------------------------------- answers


@dataclass
class Answer:
    """One assistant answer, fresh from the engine or replayed from a stored trace."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    served_name: str
    tool_calls: list[dict[str, Any]] | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)


def finish(out: EngineCompletion, stop: tuple[str, ...]) -> tuple[str, str]:
    """The engine's text and finish reason with stop strings applied (text before the first
    one, ``stop``) and, when cut at ``max_tokens``, without a dangling partial character (the
    decoder renders a multi-byte character split by the cut as U+FFFD)."""
    text, reason = out.text, out.finish_reason
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        return text[: min(hits)], "stop"
    if reason == "length":
        text = text.rstrip("\ufffd")
    return text, reason


def _reload(route: Route) -> None:
    """The serving adapter is missing from the engine (it restarted): verify and load it again."""
    from app.models import Snapshot

    snapshot = Snapshot(served_name=route.served_name, adapter_path=route.adapter_path,
                        adapter_sha256=route.adapter_sha256)
    try:
        verify_adapter(snapshot)
    except PromotionError as exc:
        raise ServiceUnavailable(f"the serving adapter cannot be loaded: {exc}") from exc
    assert route.adapter_path is not None
    route.engine.load_adapter(route.served_name, route.adapter_path)


def generate(route: Route) -> Answer:
    # The request's tools reach the model the way regeneration renders them (``with_tools``).
    messages = with_tools(engine_messages(route.body), [
        t.model_dump(mode="json", exclude_none=True) for t in route.body.tools or []])

    def call() -> EngineCompletion:
        try:
            return route.engine.complete(route.model, messages, route.params)
        except UnknownAdapterError:
            _reload(route)
            return route.engine.complete(route.model, messages, route.params)

    try:
        out = call()
    except EngineUnavailable as exc:
        raise ServiceUnavailable(f"the serving engine is unavailable: {exc}",
                                 retry_after=5) from exc
    except EngineError as exc:
        raise ServiceUnavailable(f"the serving engine failed: {exc}") from exc
    text, reason = finish(out, route.stop)
    return Answer(text=text, finish_reason=reason, prompt_tokens=out.prompt_tokens,
                  completion_tokens=out.completion_tokens, served_name=route.served_name)


def replay(trace: Trace) -> Answer:
    message = trace.response_message or {}
    usage = trace.usage or {}
    return Answer(
        text=trace.response,
        finish_reason=trace.finish_reason or "stop",
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        served_name=trace.model or "",
        tool_calls=message.get("tool_calls"),
        created=int(trace.created_at.timestamp()),
    )


def stored_answer(session: Session, principal: Principal, route: Route) -> Answer | None:
    """The stored answer for a retry of this request, None for a new one; a 409 when the id was
    used for another request."""
    if not route.client_chose_id:
        return None
    trace = traces.find(session, principal.tenant, route.completion_id)
    if trace is None:
        return None
    if trace.meta.get(FINGERPRINT_KEY) != route.fingerprint():
        raise Conflict(
            f"X-Tracelearn-External-Id {route.completion_id!r} was already used for another "
            "request", param="X-Tracelearn-External-Id", code="idempotency_key_reused",
        )
    return replay(trace)


def record(
    session: Session, principal: Principal, route: Route, answer: Answer, settings: Settings,
    untrainable: str | None = None,
) -> str:
    """Ingest the exchange as a trace; returns the item's ingest status."""
    body = route.body
    metadata: dict[str, Any] = {"source": "proxy"} | (body.metadata or {})
    metadata[FINGERPRINT_KEY] = route.fingerprint()
    item: dict[str, Any] = {
        "external_id": route.completion_id,
        "policy": route.policy,
        "messages": [m.model_dump(mode="json", exclude_unset=True) for m in body.messages],
        "sampling_params": route.stored_sampling(),
        # What the model generated, control characters included; a NUL (which no database
        # column holds) becomes U+FFFD.
        "response": answer.text.replace("\x00", "\ufffd"),
        "usage": answer.usage().model_dump(),
        "model": route.served_name,
        "metadata": metadata,
    }
    if untrainable is None:
        item["finish_reason"] = answer.finish_reason
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if name in body.model_fields_set:
            value = getattr(body, name)
            item[name] = ([t.model_dump(mode="json", exclude_unset=True) for t in value]
                          if name == "tools" and value is not None else value)
    if body.user:
        item["user_id"] = body.user
    result = traces.ingest(session, principal, [item], settings, untrainable=untrainable,
                           generated_response=True)
    status = result.results[0].status.value
    if status not in ("created", "duplicate"):
        if status != "conflict":  # a conflict is a concurrent retry's answer: see complete()
            TRACES_UNRECORDED.labels(status).inc()
        log.warning("proxy trace %s not recorded: %s", route.completion_id,
                    result.results[0].error)
    return status


def to_completion(route: Route, answer: Answer) -> ChatCompletionOut:
    message = ChoiceMessage(content=answer.text if answer.text or not answer.tool_calls else None,
                            tool_calls=answer.tool_calls)  # type: ignore[arg-type]
    return ChatCompletionOut(
        id=route.completion_id, created=answer.created, model=answer.served_name,
        choices=[Choice(message=message, finish_reason=answer.finish_reason)],
        usage=answer.usage(),
    )


def complete(
    session: Session, principal: Principal, body: ChatCompletionIn, settings: Settings,
    completion_id: str | None = None,
) -> tuple[ChatCompletionOut, Route, str]:
    route = resolve(session, principal, body, settings, completion_id)
    stored = stored_answer(session, principal, route)
    if stored is not None:
        return to_completion(route, stored), route, "duplicate"
    answer = generate(route)
    status = record(session, principal, route, answer, settings)
    if status == "conflict":
        # A concurrent retry stored its answer first: that one is the answer for this id.
        stored = stored_answer(session, principal, route)
        if stored is not None:
            return to_completion(route, stored), route, "duplicate"
        TRACES_UNRECORDED.labels(status).inc()
    return to_completion(route, answer), route, status


# ---------------------------------------------------------------- streaming


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == len(words) - 1 else w + " " for i, w in enumerate(words) if w or i == 0]


def _record_aborted(principal: Principal, route: Route, answer: Answer, settings: Settings,
                    sent: str) -> None:
    STREAMS_ABORTED.inc()
    log.warning("client aborted the stream of %s after %d characters", route.completion_id,
                len(sent))
    aborted = Answer(text=sent, finish_reason="aborted", prompt_tokens=answer.prompt_tokens,
                     completion_tokens=answer.completion_tokens, served_name=answer.served_name)
    try:
        with get_database().session() as session:
            record(session, principal, route, aborted, settings, untrainable="aborted")
    except Exception:
        TRACES_UNRECORDED.labels("error").inc()
        log.exception("could not record aborted stream %s", route.completion_id)


async def stream(
    principal: Principal, route: Route, settings: Settings, stored: Answer | None = None
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; the trace is recorded once the stream ends,
    or, flagged ``aborted`` and untrainable, when the client goes away before that.

    Runs after the request's transaction has closed, so recording opens its own.
    """
    include_usage = bool(route.body.stream_options and route.body.stream_options.include_usage)
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None, served: str) -> str:
        payload: dict[str, Any] = {
            "id": route.completion_id, "object": "chat.completion.chunk", "created": created,
            "model": served, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return _event(payload)

    sent: list[str] = []
    answer = Answer(text="", finish_reason="aborted", prompt_tokens=0, completion_tokens=0,
                    served_name=route.served_name)
    done = False
    try:
        yield chunk({"role": "assistant"}, None, route.served_name)
        try:
            answer = stored if stored is not None else await run_in_threadpool(generate, route)
        except ServiceUnavailable as exc:
            # Headers are already sent: report in-band, as OpenAI-compatible servers do.
            done = True
            yield _event({"error": {"message": exc.detail, "type": "server_error",
                                    "param": None, "code": "unavailable"}})
            return
        for piece in _pieces(answer.text):
            # A checkpoint per chunk: sends to a gone client do not fail, so this is where the
            # server's disconnect listener gets to cancel the stream.
            await anyio.sleep(0)
            yield chunk({"content": piece}, None, answer.served_name)
            sent.append(piece)
        await anyio.sleep(0)
        if answer.tool_calls:
            calls = [c | {"index": i} for i, c in enumerate(answer.tool_calls)]
            yield chunk({"tool_calls": calls}, None, answer.served_name)
        yield chunk({}, answer.finish_reason, answer.served_name)
        if include_usage:
            yield _event({"id": route.completion_id, "object": "chat.completion.chunk",
                          "created": created, "model": answer.served_name, "choices": [],
                          "usage": answer.usage().model_dump()})
        # Recorded before [DONE], so a client that reads the trace after the stream finds it.
        done = True
        if stored is None:
            with anyio.CancelScope(shield=True):  # the client has had every chunk: record it
                await run_in_threadpool(_record_streamed, principal, route, answer, settings)
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            # Cancelled or closed mid-stream (the client went away): record what it was sent.
            _record_aborted(principal, route, answer, settings, "".join(sent))


def _record_streamed(principal: Principal, route: Route, answer: Answer,
                     settings: Settings) -> None:
    try:
        with get_database().session() as session:
            record(session, principal, route, answer, settings)
    except Exception:
        # The client already has its answer; a lost trace is counted and logged, never raised
        # into the stream.
        TRACES_UNRECORDED.labels("error").inc()
        log.exception("could not record streamed trace %s", route.completion_id)
