"""What an OTLP span and its log events leave behind until the other half arrives.

`opentelemetry-instrumentation-openai-v2` (and others on the 1.28–1.35 conventions) put a model
call's messages in *log records* (`gen_ai.user.message`, `gen_ai.choice`, …) tied to the span by
trace and span id, exported apart from the span and in no set order. So:

- log events are kept per span (``otel-events``) and merged into the span when it arrives;
- a span stored without content (``content_not_captured``) is kept (``otel-span``), so events
  arriving after it can fill the stored trace in.

Rows live in the staging table the Langfuse receiver uses for its observations arriving in
pieces (``langfuse_observations``; ``kind`` tells them apart, ``lf_id`` is the span's external
id), which spares a table of the same shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import upsert_insert, utcnow
from app.models import LangfuseObservation
from app.receivers.otlp.mapping import EventView, SpanView

EVENTS, SPAN = "otel-events", "otel-span"


def _row(session: Session, tenant: str, kind: str, external_id: str) -> LangfuseObservation:
    now = utcnow()
    session.execute(
        upsert_insert(session, LangfuseObservation.__table__).on_conflict_do_nothing(
            index_elements=["tenant", "kind", "lf_id"]),
        [{"tenant": tenant, "kind": kind, "lf_id": external_id, "body": {}, "created_at": now,
          "updated_at": now}],
    )
    row = _find(session, tenant, kind, external_id)
    assert row is not None
    return row


def _find(session: Session, tenant: str, kind: str, external_id: str
          ) -> LangfuseObservation | None:
    return session.scalar(select(LangfuseObservation).where(
        LangfuseObservation.tenant == tenant, LangfuseObservation.kind == kind,
        LangfuseObservation.lf_id == external_id))


def _event_dict(event: EventView) -> dict[str, Any]:
    return dataclasses.asdict(event)


def add_events(session: Session, tenant: str, external_id: str, events: list[EventView]
               ) -> list[EventView]:
    """Keep ``events`` for the span (a re-exported event is kept once); returns all of them."""
    row = _row(session, tenant, EVENTS, external_id)
    kept = list(row.body.get("events", []))
    kept += [e for e in map(_event_dict, events) if e not in kept]
    row.body = {"events": kept}
    session.flush()
    return [EventView(**e) for e in kept]


def events_for(session: Session, tenant: str, external_id: str) -> list[EventView]:
    row = _find(session, tenant, EVENTS, external_id)
    return [EventView(**e) for e in row.body.get("events", [])] if row else []


def keep_span(session: Session, tenant: str, span: SpanView, trace_id: int) -> None:
    row = _row(session, tenant, SPAN, span.external_id)
    row.body, row.trace_id = dataclasses.asdict(span), trace_id
    session.flush()


def kept_span(session: Session, tenant: str, external_id: str) -> SpanView | None:
    row = _find(session, tenant, SPAN, external_id)
    if row is None:
        return None
    body = dict(row.body)
    body["events"] = [EventView(**e) for e in body["events"]]
    return SpanView(**body)
