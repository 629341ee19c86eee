"""Langfuse's ingestion API onto our traces: a generation becomes a trace, a score an outcome.

Langfuse sends an observation in pieces — ``generation-create`` with the input, later a
``generation-update`` with the output and usage, not necessarily in the same batch — so trace and
generation bodies are staged (merged, latest non-null value wins) in ``langfuse_observations``
until a generation has both input and output; then it is ingested through the traces service like
any other trace (external_id = the generation id, so re-sent batches are idempotent).

A generation's input is its messages, or ``{"messages", "tools", "tool_choice"}`` (how Langfuse's
OpenAI integration logs a call with tools): the tool definitions are kept with the trace.

Which policy a generation belongs to: ``metadata.policy`` on the generation or its trace, else a
policy named like the generation's ``model``. Spans and events are acknowledged and not stored:
they are not model calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.service import Principal
from app.db import upsert_insert, utcnow
from app.errors import PayloadTooLarge, printable
from app.models import LangfuseObservation, OutcomeOrigin, OutcomeSource, Policy
from app.receivers.langfuse.schemas import (
    IngestionError,
    IngestionEvent,
    IngestionResult,
    IngestionSuccess,
)
from app.settings import Settings
from app.traces import service as traces
from app.traces.outcomes import Label, set_outcomes
from app.traces.schemas import SamplingParamsIn
from app.traces.strings import describe, string_problems

GENERATION_EVENTS = frozenset({"generation-create", "generation-update"})
IGNORED_EVENTS = frozenset({"span-create", "span-update", "event-create", "sdk-log",
                            "observation-create", "observation-update"})
_SAMPLING_KEYS = frozenset(SamplingParamsIn.model_fields)
_RESPONSE_KEYS = ("role", "content", "tool_calls", "refusal")


class EventError(Exception):
    def __init__(self, status: int, message: str, error: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error = status, message, error


def ingest_batch(
    session: Session, principal: Principal, batch: list[Any], settings: Settings
) -> IngestionResult:
    if len(batch) > settings.max_batch_items:
        raise PayloadTooLarge(
            f"batch has {len(batch)} events; the limit is {settings.max_batch_items}"
        )
    tenant = principal.tenant
    outcome: dict[str, tuple[int, str, Any] | None] = {}  # event id → error (None: success)
    order: list[str] = []
    completed_by: dict[str, str] = {}  # generation id → the event that last touched it
    scores: list[IngestionEvent] = []
    for index, raw in enumerate(batch):
        event_id = str(raw.get("id") or f"#{index}") if isinstance(raw, dict) else f"#{index}"
        event_id = printable(event_id)  # echoed in the answer, so it must be renderable
        order.append(event_id)
        hostile = string_problems(raw)
        if hostile:
            outcome[event_id] = (400, f"the event holds a refused string: {describe(hostile)}",
                                 hostile)
            continue
        try:
            event = IngestionEvent.model_validate(raw)
        except ValidationError as exc:
            outcome[event_id] = (400, "the event did not validate",
                                 exc.errors(include_url=False, include_input=False))
            continue
        try:
            if event.type == "trace-create":
                _stage(session, tenant, "trace", event.body, None)
            elif event.type in GENERATION_EVENTS:
                gen_id = _stage(session, tenant, "generation", event.body,
                                event.body.get("traceId"))
                completed_by[gen_id] = event.id
            elif event.type == "score-create":
                scores.append(event)
            elif event.type not in IGNORED_EVENTS:
                raise EventError(400, f"event type {event.type!r} is not supported")
            outcome[event.id] = None
        except EventError as exc:
            outcome[event.id] = (exc.status, exc.message, exc.error)

    for gen_id, event_id in completed_by.items():
        try:
            _promote(session, principal, gen_id, settings)
        except EventError as exc:
            outcome[event_id] = (exc.status, exc.message, exc.error)
    for event in scores:
        try:
            _score(session, principal, event.body)
        except EventError as exc:
            outcome[event.id] = (exc.status, exc.message, exc.error)

    successes, errors = [], []
    for event_id in order:
        result = outcome.get(event_id)
        if result is None:
            successes.append(IngestionSuccess(id=event_id, status=201))
        else:
            errors.append(IngestionError(id=event_id, status=result[0], message=result[1],
                                         error=result[2]))
    return IngestionResult(successes=successes, errors=errors)


def _stage(
    session: Session, tenant: str, kind: str, body: dict[str, Any], lf_trace_id: Any
) -> str:
    lf_id = body.get("id")
    if not isinstance(lf_id, str) or not lf_id or len(lf_id) > 256:
        raise EventError(400, f"a {kind} event needs a string body.id")
    table = LangfuseObservation.__table__
    now = utcnow()
    session.execute(
        upsert_insert(session, table).on_conflict_do_nothing(
            index_elements=["tenant", "kind", "lf_id"]),
        [{"tenant": tenant, "kind": kind, "lf_id": lf_id, "body": {}, "created_at": now,
          "updated_at": now,
          "lf_trace_id": lf_trace_id if isinstance(lf_trace_id, str) else None}],
    )
    row = _row(session, tenant, kind, lf_id)
    assert row is not None
    row.body = row.body | {k: v for k, v in body.items() if v is not None}
    if isinstance(lf_trace_id, str):
        row.lf_trace_id = lf_trace_id
    session.flush()
    return lf_id


def _row(session: Session, tenant: str, kind: str, lf_id: str) -> LangfuseObservation | None:
    return session.scalar(select(LangfuseObservation).where(
        LangfuseObservation.tenant == tenant, LangfuseObservation.kind == kind,
        LangfuseObservation.lf_id == lf_id))


def _promote(session: Session, principal: Principal, gen_id: str, settings: Settings) -> None:
    """Ingest a staged generation once it has input and output; a no-op before, and after."""
    gen = _row(session, principal.tenant, "generation", gen_id)
    assert gen is not None
    body = gen.body
    if gen.trace_id is not None or body.get("input") is None or body.get("output") is None:
        return
    trace = (_row(session, principal.tenant, "trace", gen.lf_trace_id)
             if gen.lf_trace_id else None)
    trace_body = trace.body if trace is not None else {}
    item = _trace_item(session, principal.tenant, gen_id, body, trace_body)
    result = traces.ingest(session, principal, [item], settings).results[0]
    if result.id is None or result.status.value not in ("created", "duplicate"):
        error = result.error or {}
        raise EventError(int(error.get("status", 422)), str(error.get("detail", "")),
                         error.get("errors"))
    gen.trace_id = result.id


def _trace_item(
    session: Session, tenant: str, gen_id: str, body: dict[str, Any], trace: dict[str, Any]
) -> dict[str, Any]:
    gen_meta = _dict(body.get("metadata"))
    trace_meta = _dict(trace.get("metadata"))
    item: dict[str, Any] = {
        "external_id": gen_id,
        "policy": _policy_name(session, tenant, gen_meta, trace_meta, body.get("model")),
        "messages": messages_from(body["input"]),
        "response": response_from(body["output"]),
        "metadata": {**trace_meta, **gen_meta, "source": "langfuse",
                     "langfuse_trace_id": body.get("traceId"),
                     "langfuse_name": body.get("name")},
    }
    if isinstance(body.get("model"), str):
        item["model"] = body["model"]
    # Langfuse's OpenAI integration logs a call with tools as {"messages", "tools", "tool_choice"}.
    request = _dict(body["input"])
    for key in ("tools", "tool_choice", "parallel_tool_calls"):
        if request.get(key) is not None:
            item[key] = request[key]
    sampling = sampling_from(body.get("modelParameters"))
    if sampling:
        item["sampling_params"] = sampling
    usage = usage_from(body.get("usageDetails") or body.get("usage"))
    if usage:
        item["usage"] = usage
    for ours, theirs in (("user_id", "userId"), ("session_id", "sessionId"), ("tags", "tags")):
        if trace.get(theirs):
            item[ours] = trace[theirs]
    if isinstance(body.get("startTime"), str):
        item["occurred_at"] = body["startTime"]
    return item


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _policy_name(
    session: Session, tenant: str, gen_meta: dict[str, Any], trace_meta: dict[str, Any],
    model: Any,
) -> str:
    for meta in (gen_meta, trace_meta):
        if isinstance(meta.get("policy"), str):
            return str(meta["policy"])
    if isinstance(model, str) and session.scalar(
        select(Policy.id).where(Policy.tenant == tenant, Policy.name == model)
    ):
        return model
    raise EventError(422, "cannot tell which policy this generation belongs to: set "
                     "metadata.policy on the generation or its trace, or name the policy as "
                     "its model")


# The shapes of a Langfuse generation's fields, shared with the OTLP receiver (Langfuse's OTel
# attributes carry the same values as JSON).

def sampling_from(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        return {}
    return {k: v for k, v in params.items() if k in _SAMPLING_KEYS and v is not None}


def messages_from(value: Any) -> Any:
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return value  # validated (and refused with the reason) by the traces service


def response_from(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: value[k] for k in _RESPONSE_KEYS if value.get(k) is not None}
    return value


def usage_from(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    pairs = (("input", "output", "total"), ("promptTokens", "completionTokens", "totalTokens"),
             ("prompt_tokens", "completion_tokens", "total_tokens"))
    for p, c, t in pairs:
        if isinstance(value.get(p), int) and isinstance(value.get(c), int):
            total = value.get(t) if isinstance(value.get(t), int) else value[p] + value[c]
            return {"prompt_tokens": value[p], "completion_tokens": value[c],
                    "total_tokens": total}
    return None


def _score(session: Session, principal: Principal, body: dict[str, Any]) -> None:
    """A score is feedback: it outranks an inline outcome, and the later label wins."""
    name, value = body.get("name"), body.get("value")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise EventError(400, "a score needs a name of at most 128 characters")
    if not isinstance(value, bool | int | float | str) or (
            isinstance(value, str) and len(value) > 256):
        raise EventError(400, "a score value is a number, a boolean or a short string")
    targets = _score_targets(session, principal.tenant, body)
    if not targets:
        raise EventError(404, f"no generation of trace {body.get('traceId')!r} has arrived; "
                         "send a trace-level score after its generations")
    now = utcnow()
    value = traces.redact_outcome_value(value, traces.outcome_redactor(session, principal.tenant))
    set_outcomes(session, principal.tenant, principal.actor, [
        Label(trace_external_id=lf_id, name=name, value=value, source=OutcomeSource.api,
              origin=OutcomeOrigin.feedback, labelled_at=now, trace_id=trace_id)
        for lf_id, trace_id in targets
    ])


def _score_targets(
    session: Session, tenant: str, body: dict[str, Any]
) -> Iterable[tuple[str, int | None]]:
    """The generations a score is about: the one it names, else every generation of its trace
    (an outcome of the whole interaction applies to each model call in it)."""
    observation = body.get("observationId")
    if isinstance(observation, str) and observation:
        row = _row(session, tenant, "generation", observation)
        return [(observation, row.trace_id if row else None)]
    trace_id = body.get("traceId")
    if not isinstance(trace_id, str):
        return []
    rows = session.execute(select(LangfuseObservation.lf_id, LangfuseObservation.trace_id).where(
        LangfuseObservation.tenant == tenant, LangfuseObservation.kind == "generation",
        LangfuseObservation.lf_trace_id == trace_id))
    return [(lf_id, tid) for lf_id, tid in rows]
