"""The logging proxy: a chat request naming a policy is answered by that policy's serving snapshot
through the serving engine, and the exchange is ingested as a trace that records which snapshot
served it — how a customer gets traces in without writing any code.

The completion id doubles as the trace's ``external_id``, so outcomes can be posted later to
``/v1/feedback`` with the id the client already holds.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.auth.service import Principal
from app.db import get_database
from app.engines import engine_for
from app.errors import ServiceUnavailable
from app.policies.service import get_policy, sampling_params
from app.proxy.schemas import ChatCompletionIn, ChatCompletionOut, Choice, ChoiceMessage, Usage
from app.settings import Settings
from app.snapshots.promotion import PromotionError, verify_adapter
from app.traces import service as traces
from workers.inference.base import SamplingParams, UnknownAdapterError
from workers.inference.serving import (
    EngineCompletion,
    EngineError,
    EngineUnavailable,
    ServingEngine,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where one request goes, resolved inside the request's transaction."""

    policy: str
    served_name: str
    adapter_path: str | None
    adapter_sha256: str | None
    engine: ServingEngine
    params: SamplingParams
    messages: list[dict[str, str]]
    completion_id: str

    @property
    def model(self) -> str | None:
        return self.served_name if self.adapter_path else None


def resolve(
    session: Session, principal: Principal, body: ChatCompletionIn, settings: Settings,
    completion_id: str | None = None,
) -> Route:
    policy = get_policy(session, principal.tenant, body.model)
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
        messages=[m.model_dump() for m in body.messages],
        completion_id=completion_id or f"chatcmpl-{uuid.uuid4().hex}",
    )


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


def _with_engine_errors(fn: Any) -> Any:
    try:
        return fn()
    except EngineUnavailable as exc:
        raise ServiceUnavailable(f"the serving engine is unavailable: {exc}",
                                 retry_after=5) from exc
    except EngineError as exc:
        raise ServiceUnavailable(f"the serving engine failed: {exc}") from exc


def generate(route: Route) -> EngineCompletion:
    def call() -> EngineCompletion:
        try:
            return route.engine.complete(route.model, route.messages, route.params)
        except UnknownAdapterError:
            _reload(route)
            return route.engine.complete(route.model, route.messages, route.params)

    result: EngineCompletion = _with_engine_errors(call)
    return result


def record(
    session: Session, principal: Principal, route: Route, body: ChatCompletionIn,
    text: str, settings: Settings,
) -> str:
    """Ingest the exchange as a trace; returns the item's ingest status."""
    metadata: dict[str, Any] = {"source": "proxy"} | (body.metadata or {})
    if body.user:
        metadata["user"] = body.user
    item = {
        "external_id": route.completion_id,
        "policy": route.policy,
        "messages": route.messages,
        "response": text,
        "model": route.served_name,
        "metadata": metadata,
    }
    result = traces.ingest(session, principal, [item], settings)
    status = result.results[0].status.value
    if status not in ("created", "duplicate"):
        log.warning("proxy trace %s not recorded: %s", route.completion_id,
                    result.results[0].error)
    return status


def complete(
    session: Session, principal: Principal, body: ChatCompletionIn, settings: Settings,
    completion_id: str | None = None,
) -> tuple[ChatCompletionOut, Route, str]:
    route = resolve(session, principal, body, settings, completion_id)
    out = generate(route)
    status = record(session, principal, route, body, out.text, settings)
    response = ChatCompletionOut(
        id=route.completion_id,
        created=int(time.time()),
        model=route.served_name,
        choices=[Choice(message=ChoiceMessage(content=out.text),
                        finish_reason=out.finish_reason)],
        usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                    total_tokens=out.prompt_tokens + out.completion_tokens),
    )
    return response, route, status


def _chunk(route: Route, created: int, delta: dict[str, str], finish: str | None) -> str:
    payload = {
        "id": route.completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": route.served_name,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def stream(
    principal: Principal, body: ChatCompletionIn, route: Route, settings: Settings
) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format; the trace is recorded once the stream ends.

    Runs after the request's transaction has closed, so recording opens its own.
    """
    created = int(time.time())
    yield _chunk(route, created, {"role": "assistant"}, None)
    pieces: list[str] = []
    try:
        try:
            deltas = route.engine.stream(route.model, route.messages, route.params)
            first = next(deltas, None)
        except UnknownAdapterError:
            _reload(route)
            deltas = route.engine.stream(route.model, route.messages, route.params)
            first = next(deltas, None)
        for piece in ([first] if first is not None else []):
            pieces.append(piece)
            yield _chunk(route, created, {"content": piece}, None)
        for piece in deltas:
            pieces.append(piece)
            yield _chunk(route, created, {"content": piece}, None)
    except (EngineError, UnknownAdapterError, ServiceUnavailable) as exc:
        # Headers are already sent: report in-band, as OpenAI-compatible servers do.
        error = {"error": {"message": f"the serving engine failed: {exc}",
                           "type": "unavailable"}}
        yield f"data: {json.dumps(error)}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield _chunk(route, created, {}, "stop")
    yield "data: [DONE]\n\n"
    try:
        with get_database().session() as session:
            record(session, principal, route, body, "".join(pieces), settings)
    except Exception:
        # The client already has its answer; a lost trace is logged, never raised into the stream.
        log.exception("could not record streamed trace %s", route.completion_id)
