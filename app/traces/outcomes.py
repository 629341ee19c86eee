"""Outcome precedence: which label a trace keeps when several arrive for the same name.

An outcome is keyed by (tenant, trace external id, name). Labels arrive two ways:

- **inline**, with the trace itself (``outcome`` in ``POST /v1/traces``): what the client knew
  when it logged the call;
- **feedback**, afterwards (``POST /v1/feedback``, Langfuse scores): an explicit later label —
  a human annotation, a delayed ground truth.

The rule, decided by ``outranks`` and nowhere else:

1. feedback outranks inline, whatever their times;
2. within one origin, the later ``labelled_at`` wins (feedback may give its label time; by
   default it is the time the label arrives, and a time in the future counts as now); at equal
   times the one that arrives last wins;
3. a retry (a duplicate trace) never touches a stored outcome: inline labels are written only
   when their trace is created.

Every change (a new outcome, another value, source or origin) is written to the audit log with
who made it and the label before and after. A label that re-states the stored one only moves its
time forward; a label the stored one outranks changes nothing.

Writes are race-safe: stored rows are read ``FOR UPDATE`` (Postgres; SQLite serialises writers),
new keys are inserted ``ON CONFLICT DO NOTHING``, and a key a concurrent request inserted first is
read again and decided against that row.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from app.audit import record_each
from app.db import execute_json_array, json_array_insert_sql, upsert_insert, utcnow
from app.models import Outcome, OutcomeOrigin, OutcomeSource

_RANK = {OutcomeOrigin.inline: 0, OutcomeOrigin.feedback: 1}
_CHUNK = 500


@dataclass(frozen=True)
class Label:
    """One outcome as it arrives, or as it is stored."""

    trace_external_id: str
    name: str
    value: Any
    source: OutcomeSource
    origin: OutcomeOrigin
    labelled_at: datetime
    trace_id: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.trace_external_id, self.name

    def audit_view(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source.value, "origin": self.origin.value,
                "labelled_at": self.labelled_at.isoformat()}


class Decision(enum.StrEnum):
    created = "created"  # no outcome of that name before
    changed = "changed"  # replaced the stored label
    restated = "restated"  # the same label again: only its time moves forward
    outranked = "outranked"  # the stored label outranks it: nothing changes


def label_time(at: datetime | None, now: datetime) -> datetime:
    """When a label was made: as given (naive means UTC), never later than ``now``."""
    if at is None:
        return now
    return min(_aware(at), now)


def outranks(new: Label, stored: Label) -> bool:
    """The precedence rule: feedback over inline; within one origin the later label, and at
    equal times the one that arrives last."""
    return (_RANK[new.origin], new.labelled_at) >= (_RANK[stored.origin], stored.labelled_at)


def _same_label(a: Label, b: Label) -> bool:
    # json.dumps tells true from 1 and 1 from 1.0, which == does not.
    return (json.dumps(a.value), a.source, a.origin) == (json.dumps(b.value), b.source, b.origin)


def set_outcomes(
    session: Session, tenant: str, actor: str, labels: Sequence[Label]
) -> list[Decision]:
    """Apply ``labels`` in order under the precedence rule; one decision per label."""
    if not labels:
        return []
    stored = _stored(session, tenant, {label.key for label in labels})
    decisions, final, new_keys = _decide(labels, stored)
    inserted = _insert(session, tenant, [final[k] for k in new_keys])
    lost_race = [k for k in new_keys if k not in inserted]
    if lost_race:
        # A concurrent request inserted these keys first: decide again against its rows.
        again = [(i, label) for i, label in enumerate(labels) if label.key in set(lost_race)]
        for key in lost_race:
            final.pop(key)
        stored |= _stored(session, tenant, set(lost_race))
        redo, redo_final, _ = _decide([label for _, label in again], stored)
        for (i, _), decision in zip(again, redo, strict=True):
            decisions[i] = decision
        final |= redo_final
    changed_keys = [k for k in final if k in stored and final[k] is not stored[k][1]]
    _update(session, [(stored[k][0], final[k]) for k in changed_keys])
    changes: list[tuple[int | str, dict[str, Any], dict[str, Any]]] = [
        (row_id, {}, {"trace_external_id": key[0], "name": key[1], **final[key].audit_view()})
        for key, row_id in inserted.items()
    ]
    for key in changed_keys:
        old, new = stored[key][1], final[key]
        if not _same_label(old, new):
            changes.append((
                stored[key][0],
                {"trace_external_id": key[0], "name": key[1], **old.audit_view()},
                {"trace_external_id": key[0], "name": key[1], **new.audit_view()}))
    record_each(session, tenant, actor, "outcome.set", "outcome", changes)
    return decisions


def _decide(
    labels: Iterable[Label], stored: dict[tuple[str, str], tuple[int, Label]]
) -> tuple[list[Decision], dict[tuple[str, str], Label], list[tuple[str, str]]]:
    """Fold the labels, in order, onto what is stored: (decisions, final label per key that is
    written, keys to insert)."""
    current = {key: label for key, (_, label) in stored.items()}
    final: dict[tuple[str, str], Label] = {}
    new_keys: list[tuple[str, str]] = []
    decisions: list[Decision] = []
    for label in labels:
        key = label.key
        held = current.get(key)
        if held is None:
            decisions.append(Decision.created)
            new_keys.append(key)
        elif not outranks(label, held):
            decisions.append(Decision.outranked)
            continue
        elif _same_label(label, held):
            decisions.append(Decision.restated)
            label = replace(held, labelled_at=label.labelled_at,
                            trace_id=label.trace_id or held.trace_id)
        else:
            decisions.append(Decision.changed if key not in new_keys else Decision.created)
            label = replace(label, trace_id=label.trace_id or held.trace_id)
        current[key] = final[key] = label
    return decisions, final, new_keys


def _stored(
    session: Session, tenant: str, keys: set[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int, Label]]:
    found: dict[tuple[str, str], tuple[int, Label]] = {}
    external_ids = sorted({ext for ext, _ in keys})
    names = sorted({name for _, name in keys})
    t = Outcome.__table__.c
    for i in range(0, len(external_ids), _CHUNK):
        rows = session.execute(
            select(t.id, t.trace_external_id, t.name, t.value, t.source, t.origin,
                   t.labelled_at, t.trace_id)
            .where(t.tenant == tenant, t.trace_external_id.in_(external_ids[i : i + _CHUNK]),
                   t.name.in_(names))
            .with_for_update()
        )
        for row_id, ext, name, value, source, origin, at, trace_id in rows:
            if (ext, name) in keys:
                found[(ext, name)] = (row_id, Label(
                    trace_external_id=ext, name=name, value=value,
                    source=OutcomeSource(source), origin=OutcomeOrigin(origin),
                    labelled_at=_aware(at), trace_id=trace_id,
                ))
    return found


def _aware(at: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they were stored in UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _insert(session: Session, tenant: str, labels: list[Label]) -> dict[tuple[str, str], int]:
    """The new labels' rows, where no row of their key exists yet: their ids by key."""
    if not labels:
        return {}
    now = utcnow()
    rows = [
        {"tenant": tenant, "trace_external_id": label.trace_external_id, "name": label.name,
         "trace_id": label.trace_id, "value": label.value, "source": label.source,
         "origin": label.origin, "labelled_at": label.labelled_at, "created_at": now,
         "updated_at": now}
        for label in labels
    ]
    returned = (_insert_postgres(session, rows)
                if session.get_bind().dialect.name == "postgresql"
                else _insert_portable(session, rows))
    return {(ext, name): row_id for row_id, ext, name in returned}


def _insert_portable(session: Session, rows: list[dict[str, Any]]) -> Iterator[Any]:
    """SQLite: one cached statement, the rows as executemany parameters."""
    table = Outcome.__table__
    stmt = (
        upsert_insert(session, table)
        .on_conflict_do_nothing(index_elements=["tenant", "trace_external_id", "name"])
        .returning(table.c.id, table.c.trace_external_id, table.c.name)
    )
    for i in range(0, len(rows), _CHUNK):
        yield from session.execute(stmt, rows[i : i + _CHUNK])


def _insert_postgres(session: Session, rows: list[dict[str, Any]]) -> list[Any]:
    """Postgres: every row as one JSON parameter (``json_array_insert_sql``): ~13 against
    ~46 ms for a batch's 1,000 outcomes as executemany parameters."""
    return execute_json_array(session, _POSTGRES_INSERT, rows)


_POSTGRES_INSERT = text(
    f"{json_array_insert_sql(Outcome)} "
    "ON CONFLICT (tenant, trace_external_id, name) DO NOTHING "
    "RETURNING id, trace_external_id, name"
)


def _update(session: Session, changes: list[tuple[int, Label]]) -> None:
    if not changes:
        return
    now = utcnow()
    # ORM bulk UPDATE by primary key: one executemany statement.
    session.execute(update(Outcome), [
        {"id": row_id, "value": label.value, "source": label.source, "origin": label.origin,
         "labelled_at": label.labelled_at, "trace_id": label.trace_id, "updated_at": now}
        for row_id, label in changes
    ])
