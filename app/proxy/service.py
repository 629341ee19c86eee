"""The logging proxy: a chat request naming a policy is answered by that policy's serving snapshot
through the serving engine, and the exchange is ingested as a trace that records which snapshot
served it — how a customer gets traces in without writing any code.

The completion id doubles as the trace's ``external_id``, so outcomes can be posted later to
``/v1/feedback`` with the id the client already holds. A client-chosen id
(``X-Tracelearn-External-Id``) works as an idempotency key: a retry with the same request gets
the stored answer back (streamed too); the same id with another request is a 409.

Both modes read the engine's stream as it is generated (``Generation``), so they agree: a
streaming client gets each piece as soon as it exists; stop strings end generation where they
appear (``finish_reason: stop``, the stop string never sent); a cut at ``max_tokens`` says
``length`` and never ends in half a character. When the request offers tools, tool calls in the
answer (``workers/inference/tool_calls.py``) come back as ``tool_calls`` with ``finish_reason:
tool_calls``, streamed as deltas too, and are stored with the trace; ``tool_choice: "none"``
leaves the answer as text.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from contextlib import aclosing, closing
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from prometheus_client import Counter
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.service import Principal
from app.db import get_database, storable_text
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
    EngineChunk,
    EngineError,
    EngineUnavailable,
    ServingEngine,
)
from workers.inference.stop_strings import StopScanner
from workers.inference.tool_calls import ParsedCall, ToolCallGate

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
    """The messages as a text-only chat template expects them: parts joined to one string; tool
    calls and ids kept for templates that render them. Roles as sent: the engine renders
    ``developer`` as ``system`` for serving and regeneration alike (``flatten_messages``)."""
    out = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text if isinstance(p, TextPart) else
                              p.refusal if isinstance(p, RefusalPart) else "" for p in content)
        message: dict[str, Any] = {
            "role": m.role, "content": content or "",
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

    @property
    def tool_names(self) -> frozenset[str]:
        """The functions the model may call: none when the request offers no tools or says
        ``tool_choice: "none"`` (its answer is then text, whatever it looks like)."""
        if self.body.tool_choice == "none":
            return frozenset()
        return frozenset(t.function.name for t in self.body.tools or [])

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
        return traces.canonical_digest(canonical)


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


class Generation:
    """One answer as the engine generates it, turned into what the client is sent.

    Stop strings end it (``StopScanner``: never sent, a possible beginning held until decided);
    when the request offers tools, text that may be a call is held (``ToolCallGate``) and the
    calls are split off at the end, as ``tool_calls`` with ``finish_reason: tool_calls`` (with
    those an engine split off itself: a vLLM server with a tool-call parser). Both modes run
    this, so a streamed answer is the JSON answer cut in pieces.
    """

    def __init__(self, route: Route) -> None:
        self.route = route
        self.stops = StopScanner(route.stop)
        self.gate = ToolCallGate(route.tool_names) if route.tool_names else None
        self.sent: list[str] = []
        self.engine_calls: tuple[ParsedCall, ...] = ()  # parsed by the engine (vLLM's parser)
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        """The answer is complete: generation can end."""
        return self.finish_reason is not None

    def feed(self, chunk: EngineChunk) -> str:
        """One chunk from the engine; returns the content to send now."""
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        self.engine_calls += chunk.tool_calls
        text = self.stops.feed(chunk.text)
        if self.stops.stopped:
            self.finish_reason = "stop"
        elif chunk.finish_reason is not None:
            text += self.stops.flush()
            self.finish_reason = chunk.finish_reason
        return self._send(self.gate.feed(text) if self.gate else text)

    def _send(self, text: str) -> str:
        self.sent.append(text)
        return text

    def finish(self) -> tuple[str, Answer]:
        """After the last chunk: the rest of the content to send, and the whole answer."""
        if self.finish_reason is None:  # the engine ended without saying why
            self.finish_reason = "stop"
            self._send(self.gate.feed(self.stops.flush()) if self.gate else self.stops.flush())
        rest, calls = self.gate.finish() if self.gate else ("", ())
        self._send(rest)
        tool_calls = [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in (*self.engine_calls, *calls)
        ]
        return rest, self._answer("tool_calls" if tool_calls else self.finish_reason,
                                  tool_calls or None)

    def aborted(self, delivered: str) -> Answer:
        """The answer of a client that went away after it was ``delivered`` this text."""
        return self._answer("aborted", None, delivered)

    def _answer(self, finish_reason: str, tool_calls: list[dict[str, Any]] | None,
                text: str | None = None) -> Answer:
        return Answer(text="".join(self.sent) if text is None else text,
                      finish_reason=finish_reason,
                      prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                      served_name=self.route.served_name, tool_calls=tool_calls)


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


def engine_chunks(route: Route) -> Generator[EngineChunk, None, None]:
    """The engine's chunks for the request, the serving adapter loaded again when the engine
    has forgotten it; engine failures as ``ServiceUnavailable``. Read and close it in one
    thread: the local engine holds its lock while it generates."""
    # The request's tools reach the model the way regeneration renders them (``with_tools``).
    messages = with_tools(engine_messages(route.body), [
        t.model_dump(mode="json", exclude_none=True) for t in route.body.tools or []],
        route.body.tool_choice)
    chunks: Iterator[EngineChunk] = iter(())
    try:
        try:
            chunks = route.engine.stream(route.model, messages, route.params)
            first = next(chunks, None)
        except UnknownAdapterError:
            _reload(route)
            chunks = route.engine.stream(route.model, messages, route.params)
            first = next(chunks, None)
        if first is None:
            return
        yield first
        yield from chunks
    except EngineUnavailable as exc:
        raise ServiceUnavailable(f"the serving engine is unavailable: {exc}",
                                 retry_after=5) from exc
    except (EngineError, UnknownAdapterError) as exc:
        raise ServiceUnavailable(f"the serving engine failed: {exc}") from exc
    finally:
        close = getattr(chunks, "close", None)  # a generator: ends the engine's generation
        if close is not None:
            close()


def generate(route: Route) -> Answer:
    """The whole answer; generation ends at the first stop string."""
    generation = Generation(route)
    with closing(engine_chunks(route)) as chunks:
        for chunk in chunks:
            generation.feed(chunk)
            if generation.done:
                break
    return generation.finish()[1]


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


def _response(answer: Answer) -> str | dict[str, Any]:
    """The answer as stored: its text, or the message with its tool calls. What the model
    generated, control characters included; a NUL (which no database column holds) becomes
    U+FFFD."""
    text = storable_text(answer.text)
    if not answer.tool_calls:
        return text
    return {"role": "assistant", "content": text or None, "tool_calls": answer.tool_calls}


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
        "response": _response(answer),
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
    # The transaction only read: end it, so no connection idles in it while the model writes
    # (seconds, for every concurrent completion); recording opens the next one.
    session.commit()
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


_PIECE = re.compile(r"\s+|\S+\s*")


def _pieces(text: str) -> list[str]:
    """A stored answer, replayed to a streaming retry, in word-sized chunks that join back to
    exactly the text: runs of spaces, tabs and newlines included (a model can emit a lone space
    token, so ``ECOG  1`` is an answer as much as ``ECOG 1``)."""
    return _PIECE.findall(text)


def _record_aborted(principal: Principal, route: Route, aborted: Answer,
                    settings: Settings) -> None:
    STREAMS_ABORTED.inc()
    log.warning("client aborted the stream of %s after %d characters", route.completion_id,
                len(aborted.text))
    try:
        with get_database().session() as session:
            record(session, principal, route, aborted, settings, untrainable="aborted")
    except Exception:
        TRACES_UNRECORDED.labels("error").inc()
        log.exception("could not record aborted stream %s", route.completion_id)


_END = object()


def _produce(route: Route, generation: Generation, deliver: Callable[[object], None],
             halt: threading.Event) -> None:
    """Runs in its own thread: generates and ``deliver``s each piece of content to send, then
    ``_END`` (an error instead of the rest). The stop strings are checked here, next to the
    engine, so generation ends at the token that completes one; ``halt`` (the reader went away)
    ends it at the next token."""
    try:
        with closing(engine_chunks(route)) as chunks:
            for chunk in chunks:
                if halt.is_set():
                    return
                text = generation.feed(chunk)
                if text:
                    deliver(text)
                if generation.done:
                    break
    except Exception as exc:
        deliver(exc)
    finally:
        deliver(_END)


async def _generated(route: Route, generation: Generation) -> AsyncGenerator[str, None]:
    """The content to send, piece by piece as it is generated. Generation runs in a thread of
    its own (the local engine's lock must be taken and released by one thread) that hands each
    piece to the event loop, so a waiting stream holds no worker thread; leaving the loop early,
    by ``break`` or cancellation, ends generation."""
    send, receive = anyio.create_memory_object_stream[object](max_buffer_size=math.inf)
    halt = threading.Event()
    loop = anyio.lowlevel.current_token()

    def deliver(item: object) -> None:
        if halt.is_set():
            return
        try:
            anyio.from_thread.run_sync(send.send_nowait, item, token=loop)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
            halt.set()  # the reader, or the whole event loop, is gone

    threading.Thread(target=_produce, args=(route, generation, deliver, halt), daemon=True,
                     name=f"generate-{route.completion_id}").start()
    try:
        async with receive:
            async for item in receive:  # a checkpoint per piece: where a disconnect cancels
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                assert isinstance(item, str)
                yield item
    finally:
        halt.set()
        send.close()


async def stream(
    principal: Principal, route: Route, settings: Settings, stored: Answer | None = None
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, each piece of the answer sent as soon as it
    is generated; the trace is recorded once the stream ends, or, flagged ``aborted`` and
    untrainable, when the client goes away before that. A retry's ``stored`` answer is replayed.

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

    generation = Generation(route)
    delivered: list[str] = []
    done = False
    try:
        yield chunk({"role": "assistant"}, None, route.served_name)
        if stored is not None:
            answer = stored
            for piece in _pieces(answer.text):
                await anyio.sleep(0)  # a checkpoint: sends to a gone client do not fail
                yield chunk({"content": piece}, None, answer.served_name)
        else:
            try:
                generated = _generated(route, generation)
                async with aclosing(generated):
                    async for text in generated:
                        yield chunk({"content": text}, None, route.served_name)
                        delivered.append(text)
            except ServiceUnavailable as exc:
                # Headers are already sent: report in-band, as OpenAI-compatible servers do.
                done = True
                yield _event({"error": {"message": exc.detail, "type": "server_error",
                                        "param": None, "code": "unavailable"}})
                return
            rest, answer = generation.finish()
            if rest:
                yield chunk({"content": rest}, None, answer.served_name)
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
        # Cancelled or closed mid-stream (the client went away): record what it was sent. A
        # replayed answer is stored already.
        if not done and stored is None:
            # In a worker thread, shielded: a database write must not stall the event loop
            # (every other stream and request) nor be cut short by the cancellation that ended
            # this stream.
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(_record_aborted, principal, route,
                                        generation.aborted("".join(delivered)), settings)


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
