"""Late outcomes: stored at once, joined to their trace now or when it arrives, under the
precedence rule of ``app.traces.outcomes`` (feedback outranks inline; the later label wins)."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.service import Principal
from app.db import utcnow
from app.errors import PayloadTooLarge, problem_body
from app.feedback.schemas import FeedbackItem, FeedbackItemResult, FeedbackResult, FeedbackStatus
from app.models import OutcomeOrigin, Trace
from app.observability import FEEDBACK_TOTAL
from app.settings import Settings
from app.traces.outcomes import Decision, Label, label_time, set_outcomes
from app.traces.service import outcome_redactor, redact_outcome_value
from app.traces.strings import describe, problem_type, string_problems

_item_adapter: TypeAdapter[FeedbackItem] = TypeAdapter(FeedbackItem)


def submit(
    session: Session, principal: Principal, raw_items: list[Any], settings: Settings
) -> FeedbackResult:
    if len(raw_items) > settings.max_batch_items:
        raise PayloadTooLarge(
            f"batch has {len(raw_items)} outcomes; the limit is {settings.max_batch_items}"
        )
    tenant = principal.tenant
    results: list[FeedbackItemResult] = []
    parsed: list[tuple[int, FeedbackItem]] = []
    for index, raw in enumerate(raw_items):
        hostile = string_problems(raw)
        if hostile:
            type_, title = problem_type(hostile)
            results.append(FeedbackItemResult(
                index=index, status=FeedbackStatus.invalid,
                error=problem_body(422, type_, title,
                                   f"the outcome holds a refused string: {describe(hostile)}",
                                   errors=hostile),
            ))
            continue
        try:
            parsed.append((index, _item_adapter.validate_python(raw)))
        except ValidationError as exc:
            errs = [
                {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            results.append(
                FeedbackItemResult(
                    index=index,
                    status=FeedbackStatus.invalid,
                    error=problem_body(
                        422,
                        "invalid-input",
                        "Invalid input",
                        "the outcome did not validate",
                        errors=errs,
                    ),
                )
            )

    by_id = {i.trace_id for _, i in parsed if i.trace_id is not None}
    by_ext = {i.trace_external_id for _, i in parsed if i.trace_external_id is not None}
    id_to_ext: dict[int, str] = {}
    ext_to_id: dict[str, int] = {}
    if by_id:
        for tid, ext in session.execute(
            select(Trace.id, Trace.external_id).where(Trace.tenant == tenant, Trace.id.in_(by_id))
        ):
            id_to_ext[tid] = ext
            ext_to_id[ext] = tid
    if by_ext:
        for tid, ext in session.execute(
            select(Trace.id, Trace.external_id).where(
                Trace.tenant == tenant, Trace.external_id.in_(by_ext)
            )
        ):
            ext_to_id[ext] = tid

    now = utcnow()
    redactor = outcome_redactor(session, tenant) if parsed else None
    labels: list[Label] = []
    accepted: list[tuple[int, int | None]] = []  # (index, trace id) per label, in order
    for index, item in parsed:
        if item.trace_id is not None:
            if item.trace_id not in id_to_ext:
                results.append(
                    FeedbackItemResult(
                        index=index,
                        status=FeedbackStatus.not_found,
                        error=problem_body(
                            404, "not-found", "Not found", f"no trace with id {item.trace_id}"
                        ),
                    )
                )
                continue
            ext = id_to_ext[item.trace_id]
        else:
            assert item.trace_external_id is not None
            ext = item.trace_external_id
        trace_id = ext_to_id.get(ext)
        value = redact_outcome_value(item.value, redactor)
        labels.append(Label(trace_external_id=ext, name=item.name, value=value,
                            source=item.source, origin=OutcomeOrigin.feedback,
                            labelled_at=label_time(item.labelled_at, now), trace_id=trace_id))
        accepted.append((index, trace_id))
    # Applied in order, so within a batch too the later of two equal labels wins.
    decisions = set_outcomes(session, tenant, principal.actor, labels)
    for (index, trace_id), decision in zip(accepted, decisions, strict=True):
        state = (FeedbackStatus.outranked if decision is Decision.outranked
                 else FeedbackStatus.stored if trace_id else FeedbackStatus.pending_trace)
        results.append(FeedbackItemResult(index=index, status=state, trace_id=trace_id))
    results.sort(key=lambda r: r.index)
    counts = {s.value: 0 for s in FeedbackStatus}
    for r in results:
        counts[r.status.value] += 1
    for status, n in counts.items():
        if n:
            FEEDBACK_TOTAL.labels(status).inc(n)
    return FeedbackResult(results=results, counts=counts)
