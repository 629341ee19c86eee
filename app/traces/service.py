"""Trace ingest: validate each item, redact, classify against what is stored, insert the new ones
in one statement, join outcomes — all in one transaction so a server error never half-applies a
batch."""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from types import TracebackType
from typing import Any, cast

import orjson
import psycopg
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import (
    Boolean,
    Connection,
    delete,
    exists,
    func,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import Session

from app.audit import record
from app.auth.service import Principal
from app.cache import COUNTERS_OBJECT_SQL, COUNTERS_SQL, GenerationCache, accept_generations
from app.db import execute_json_array, json_array_insert_sql, json_dumps, upsert_insert, utcnow
from app.errors import InvalidInput, NotFound, PayloadTooLarge, problem_body
from app.models import (
    Outcome,
    OutcomeOrigin,
    Policy,
    Rollout,
    RolloutGroup,
    Snapshot,
    Split,
    Trace,
    TrainingRun,
    training_run_groups,
)
from app.observability import INGEST_ADMITTED, INGEST_TOTAL
from app.settings import Settings
from app.tenants import service as tenants
from app.traces import parallel
from app.traces.outcomes import Label, set_outcomes
from app.traces.redaction import RedactionMode, Redactor
from app.traces.schemas import (
    BatchResult,
    DeletedTrace,
    ItemResult,
    ItemStatus,
    OutcomeOut,
    TraceIn,
    TraceOut,
    TracePage,
)
from app.traces.strings import describe, problem_type, string_problem, string_problems

log = logging.getLogger(__name__)

_trace_adapter: TypeAdapter[TraceIn] = TypeAdapter(TraceIn)
_CHUNK = 500


def assign_split(tenant: str, external_id: str, heldout_fraction: float) -> Split:
    """Stable train/held-out assignment: the same trace lands in the same split forever."""
    digest = hashlib.sha256(f"{tenant}\x00{external_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return Split.heldout if u < heldout_fraction else Split.train


_REQUEST_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "sampling_params")
_OPTIONAL_FIELDS = (*_REQUEST_FIELDS, "finish_reason", "usage", "tags", "user_id", "session_id")


def dump_messages(item: TraceIn) -> list[dict[str, Any]]:
    """The messages exactly as sent: unset keys left out, explicit nulls kept."""
    return [m.model_dump(mode="json", exclude_unset=True) for m in item.messages]


def _dump_response(item: TraceIn) -> str | dict[str, Any]:
    r = item.response
    return r if isinstance(r, str) else r.model_dump(mode="json", exclude_unset=True)


def content_hash(item: TraceIn) -> str:
    """Hash of what the client sent (before redaction; outcomes excluded since they may come
    later), used to tell an idempotent retry from a conflicting reuse of an external_id.

    Nulls are dropped and the chat-format fields added in 0002 enter only when sent, so a trace
    shaped as before hashes as before and its retries stay duplicates."""
    canonical_fields: dict[str, Any] = {
        "policy": item.policy,
        "messages": [m.model_dump(mode="json", exclude_none=True) for m in item.messages],
        "response": item.response if isinstance(item.response, str)
        else item.response.model_dump(mode="json", exclude_none=True),
        "model": item.model,
        "metadata": item.metadata,
    }
    for name in _OPTIONAL_FIELDS:
        value = getattr(item, name)
        if value is not None:
            canonical_fields[name] = (
                [v.model_dump(mode="json", exclude_none=True) if hasattr(v, "model_dump") else v
                 for v in value] if isinstance(value, list)
                else value.model_dump(mode="json", exclude_none=True)
                if hasattr(value, "model_dump") else value
            )
    return canonical_digest(canonical_fields)


# Where orjson writes a float other than Python does: "1e-6" for "1e-06" (exponents -6 to -9)
# and "0.00001" for "1e-05" (exponent -5). Looked for in orjson's output, where a false alarm
# (such text inside a string) only costs the slow path.
_ORJSON_OWN_FLOATS = re.compile(rb"\de-\d(?!\d)|\d\.0000")


def canonical_digest(value: Any) -> str:
    """SHA-256 of ``json.dumps(value, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)``: the bytes stored hashes were made of, so they are the contract that
    makes a retry a duplicate. orjson writes the same bytes (keys sorted by code point, the same
    escapes, UTF-8 as is) but for floats below 1e-4 and integers beyond 64 bits, where the
    stdlib writes them (``test_canonical_digest`` compares the two on random JSON); ~3 against
    ~9 µs a trace."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        text = b""
    # The substrings first (memchr speed): the regex tries every digit.
    if not text or ((b"e-" in text or b".0000" in text) and _ORJSON_OWN_FLOATS.search(text)):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()
    return hashlib.sha256(text).hexdigest()


def _parts(item: TraceIn) -> Iterator[Any]:
    for m in item.messages:
        if isinstance(m.content, list):
            yield from m.content


def inline_media(item: TraceIn) -> str | None:
    """Media is stored only by reference: inline bytes (a `data:` image, audio, file_data) are
    refused rather than stored half or dropped silently."""
    for part in _parts(item):
        if part.type == "image_url" and not part.image_url.url.startswith(("http://", "https://")):
            return "image parts must reference an http(s) URL; inline data: images are refused"
        if part.type == "input_audio":
            return "input_audio parts carry inline audio, which is refused; store audio elsewhere"
        if part.type == "file" and (part.file.file_data is not None or not part.file.file_id):
            return "file parts must reference a file_id; inline file_data is refused"
    return None


def untrainable_reason(item: TraceIn) -> str | None:
    """Why a valid trace cannot be trained on (None: it can). Training sees text only."""
    kinds = {part.type for part in _parts(item)}
    if "image_url" in kinds:
        return "image_content"
    if "file" in kinds:
        return "file_content"
    if item.finish_reason == "content_filter":
        return "content_filtered"
    return None


def _invalid(
    index: int, raw: Any, detail: str, errors: list[dict[str, Any]] | None = None,
    type_: str = "invalid-input", title: str = "Invalid input",
) -> ItemResult:
    ext = raw.get("external_id") if isinstance(raw, dict) else None
    extra = {"errors": errors} if errors else {}
    return ItemResult(
        index=index,
        # Echoed only when it can be: a refused string cannot go back in a JSON response.
        external_id=ext if isinstance(ext, str) and string_problem(ext) is None else None,
        status=ItemStatus.invalid,
        error=problem_body(422, type_, title, detail, **extra),
    )


def _string_problems(raw: Any, generated_response: bool) -> list[dict[str, Any]]:
    if not (generated_response and isinstance(raw, dict)):
        return string_problems(raw)
    sent = {key: value for key, value in raw.items() if key != "response"}
    return string_problems(sent) + string_problems(raw.get("response"), ("response",),
                                                   allow_controls=True)


def hostile_item(index: int, raw: Any, errors: list[dict[str, Any]]) -> ItemResult:
    type_, title = problem_type(errors)
    return _invalid(index, raw, f"the trace holds a refused string: {describe(errors)}", errors,
                    type_=type_, title=title)


def _conflict(index: int, external_id: str, existing_id: int) -> ItemResult:
    return ItemResult(
        index=index,
        external_id=external_id,
        status=ItemStatus.conflict,
        id=existing_id,
        error=problem_body(
            409,
            "conflict",
            "Conflict",
            f"external_id {external_id!r} was already ingested with different content",
        ),
    )


@dataclass(frozen=True)
class PolicyRef:
    """What admitting a trace needs of its policy."""

    id: int
    redaction_enabled: bool


@dataclass(frozen=True)
class Admission:
    """Everything admitting items needs besides the items, read from the session before any
    item is looked at. Plain data, so that ``admit_items`` can run in a helper process
    (``app.traces.parallel``) on part of a large batch."""

    tenant: str
    actor: str
    settings: Settings
    policies: dict[str, PolicyRef]
    tenant_mode: RedactionMode
    hash_key: bytes | None  # the tenant's token key, in hash mode
    snapshots: dict[tuple[int, str], int]  # (policy id, served name) -> snapshot id
    now: datetime
    untrainable: str | None
    generated_response: bool

    def redactor(self, policy: PolicyRef) -> Redactor | None:
        """A fresh redactor for one trace of ``policy``: the tenant's mode where the policy
        redacts, none where it does not."""
        return Redactor.for_mode(
            self.tenant_mode if policy.redaction_enabled else RedactionMode.off, self.hash_key)


def _chunks(seq: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


@dataclass(frozen=True)
class Admitted:
    """A validated, redacted trace ready to be written: its ``traces`` row, the hash a repeat
    is judged by and its inline outcome. Whoever writes it — the request itself, or the group
    writer gathering many requests' traces (``app.traces.group_commit``) — needs no more."""

    index: int
    tenant: str
    actor: str
    content_hash: str
    row: dict[str, Any]
    outcome: Label | None

    @property
    def external_id(self) -> str:
        return str(self.row["external_id"])

    @property
    def key(self) -> tuple[str, str]:
        return self.tenant, self.external_id


def ingest(
    session: Session, principal: Principal, raw_items: list[Any], settings: Settings,
    *, untrainable: str | None = None, generated_response: bool = False,
) -> BatchResult:
    """Validate, redact and store traces; ``untrainable`` flags every item with that reason
    (the proxy's aborted streams). ``generated_response``: the response is a model's output
    relayed verbatim — our serving engine's through the proxy, or an instrumented client's
    model reported over OTLP — so control characters in it are kept as the model wrote them;
    everything else passes the full string check."""
    if not raw_items:
        raise InvalidInput("a batch needs at least one trace")
    if len(raw_items) > settings.max_batch_items:
        raise PayloadTooLarge(
            f"batch has {len(raw_items)} traces; the limit is {settings.max_batch_items}"
        )
    admission = prepare(session, principal, raw_items, settings, untrainable=untrainable,
                        generated_response=generated_response)
    # Postgres inserts chunks while this thread (and the helpers) admit the next ones
    # (``OverlappedInsert``). Chunks may come back out of order; only an external_id sent more
    # than once in the batch needs its first valid occurrence inserted first, so those wait
    # for the end and go in the batch's order.
    repeated = _repeated_external_ids(raw_items)
    results: dict[int, ItemResult] = {}
    admitted: list[Admitted] = []
    held: list[Admitted] = []
    with OverlappedInsert(session) as inserts:
        for refused, entries in _admitted_chunks(list(enumerate(raw_items)), admission):
            results |= refused
            admitted += entries
            if repeated:
                held += [e for e in entries if e.external_id in repeated]
                entries = [e for e in entries if e.external_id not in repeated]
            inserts.send(entries)
        inserts.send(sorted(held, key=_by_index))
    admitted.sort(key=_by_index)
    for entry, result in zip(admitted, settle(session, admitted, inserts.inserted,
                                              inserts.awaited), strict=True):
        results[entry.index] = result
    ordered = [results[i] for i in range(len(raw_items))]
    counts = _counts(ordered)
    _count(counts)
    return BatchResult(results=ordered, counts=counts)


def _counts(results: Sequence[ItemResult]) -> dict[str, int]:
    # Tallied by member: an enum's ``.value`` is a descriptor call, a thousand of them a batch.
    tally = collections.Counter(r.status for r in results)
    return {s.value: tally[s] for s in ItemStatus}


def count_results(results: Sequence[ItemResult]) -> None:
    """The ingest metric, by status."""
    _count(_counts(results))


def _count(counts: dict[str, int]) -> None:
    for status, n in counts.items():
        if n:
            INGEST_TOTAL.labels(status).inc(n)


def admit(
    session: Session, principal: Principal, raw_items: list[Any], settings: Settings,
    *, untrainable: str | None = None, generated_response: bool = False,
) -> _AdmittedPart:
    """Everything short of writing: the results of the items refused (by index) and the rows of
    the others. Reads only what the process caches hold (policies, the tenant's redaction mode,
    served names), so on a warm cache it costs no statement beyond ``generations``."""
    admission = prepare(session, principal, raw_items, settings, untrainable=untrainable,
                        generated_response=generated_response)
    return admit_prepared(raw_items, admission)


def admit_prepared(raw_items: list[Any], admission: Admission) -> _AdmittedPart:
    """``admit`` with what it reads from the session already read (``prepare``)."""
    return _admitted_here(list(enumerate(raw_items)), admission)


# The longest policy name and served model name a trace may carry (``TraceIn``): longer ones
# fail validation, so they are not looked up.
_MAX_POLICY_NAME = 64
_MAX_MODEL_NAME = 256


def _names(raw_items: Sequence[Any], field: str, longest: int) -> set[str]:
    """The strings items carry in ``field``, before validation: a superset of what the valid
    items name (validation does not rewrite these fields). A name validation would refuse is
    not looked up: a NUL character, say, is not even a valid query parameter."""
    return {name for raw in raw_items if isinstance(raw, dict)
            and isinstance(name := raw.get(field), str) and 0 < len(name) <= longest
            and string_problem(name) is None}


def prepare(
    session: Session, principal: Principal, raw_items: Sequence[Any], settings: Settings,
    *, untrainable: str | None, generated_response: bool,
) -> Admission:
    """What admitting ``raw_items`` needs from the session: their policies, the tenant's
    redaction mode and key, the served snapshots their models name."""
    tenant = principal.tenant
    names = _names(raw_items, "policy", _MAX_POLICY_NAME)
    policies = {name: PolicyRef(policy.id, policy.redaction_enabled)
                for name, policy in _policies_by_name(session, tenant, names).items()}
    # Not read for a batch that names no policy: every item of it is refused.
    tenant_mode = tenants.redaction_mode(session, tenant) if names else RedactionMode.mask
    return Admission(
        tenant=tenant, actor=principal.actor, settings=settings, policies=policies,
        tenant_mode=tenant_mode,
        hash_key=tenants.redaction_key(tenant) if tenant_mode is RedactionMode.hash else None,
        snapshots=_served_snapshots(session, _names(raw_items, "model", _MAX_MODEL_NAME)),
        now=utcnow(), untrainable=untrainable, generated_response=generated_response)


_AdmittedPart = tuple[dict[int, ItemResult], list[Admitted]]
"""What ``admit_items`` gives: the results of the items refused, by index; the others' rows."""


def admit_items(items: Sequence[tuple[int, Any]], admission: Admission) -> _AdmittedPart:
    """The results of the items refused (by index) and the rows of the others, validated,
    hashed and redacted. Pure: reads no session, so a large batch's parts can be admitted in
    helper processes."""
    settings = admission.settings
    results: dict[int, ItemResult] = {}
    valid: list[tuple[int, TraceIn]] = []
    for index, raw in items:
        checked = _validate(index, raw, settings, admission.generated_response)
        if isinstance(checked, ItemResult):
            results[index] = checked
        else:
            valid.append((index, checked))
    redacting = admission.tenant_mode is not RedactionMode.off
    redacted = [item.external_id for _, item in valid
                if redacting and (p := admission.policies.get(item.policy)) is not None
                and p.redaction_enabled]
    leaks = dict(zip(redacted, Redactor().finds_each(redacted), strict=True))
    admitted: list[Admitted] = []
    for index, item in valid:
        policy = admission.policies.get(item.policy)
        if policy is None:
            results[index] = _invalid(index, item.model_dump(), f"unknown policy {item.policy!r}")
            continue
        leaked = leaks[item.external_id] if redacting and policy.redaction_enabled else []
        if leaked:
            # Refused, not redacted: the external_id is the idempotency key, and rewriting it
            # would merge distinct traces (every `user-[EMAIL]`) and break retries.
            results[index] = _invalid(
                index, item.model_dump(), f"external_id holds what looks like PII "
                f"({', '.join(leaked)}); send an opaque id (a UUID or a hash) instead",
                type_="pii-in-external-id", title="PII in external_id")
            continue
        # The hash is of the raw trace whatever the mode, so a retry is a duplicate even after
        # the tenant's mode changed in between.
        chash = content_hash(item)
        admitted.append(Admitted(
            index=index, tenant=admission.tenant, actor=admission.actor, content_hash=chash,
            row=_row_values(item, policy, chash,
                            admission.untrainable or untrainable_reason(item), admission),
            outcome=_inline_outcome(item, policy, admission)))
    return results, admitted


# The helper processes that admit parts of large batches (``app.traces.parallel``); what they
# import before their first part is this module.
_helpers = parallel.HelperPool(__name__)


def start_helpers(settings: Settings) -> None:
    """Start the helper processes in the background (a server at start-up), so that the first
    large batch finds them ready."""
    if (count := parallel.helper_count(settings)) > 0:
        _helpers.executor(count)


def _repeated_external_ids(raw_items: Sequence[Any]) -> set[str]:
    """The external_ids more than one item of a batch carries (before validation)."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for raw in raw_items:
        if isinstance(raw, dict) and isinstance(ext := raw.get("external_id"), str):
            if ext in seen:
                repeated.add(ext)
            seen.add(ext)
    return repeated


def _by_index(entry: Admitted) -> int:
    return entry.index


def _admitted_chunks(
    items: list[tuple[int, Any]], admission: Admission,
) -> Iterator[_AdmittedPart]:
    """``admit_items`` over ``items`` a chunk at a time, each chunk small enough for its insert
    to overlap the admission of the next. On a large batch the chunks after this thread's share
    are admitted meanwhile by the helper processes, and each is given back as soon as it is
    done, between this thread's own (a helper that died: its chunks are admitted here)."""
    settings = admission.settings
    count = (parallel.helper_count(settings)
             if len(items) >= settings.ingest_parallel_min_items else 0)
    executor = _helpers.executor(count) if count else None
    own: Sequence[tuple[int, Any]] = items
    others: list[Sequence[tuple[int, Any]]] = []
    if executor is not None:
        # This thread's share first; the rest goes out in chunks, so that each chunk's insert
        # overlaps the admission of the next one here as in the helpers.
        cut = len(items) // (count + 1)
        own, others = items[:cut], list(_chunks(items[cut:], _OVERLAP_CHUNK))
    futures = parallel.submit_all(executor, admit_items, others, admission) if executor else []
    waiting = collections.deque(zip(others, futures, strict=True))
    for chunk in _chunks(own, _OVERLAP_CHUNK):
        yield _admitted_here(chunk, admission)
        while waiting and waiting[0][1].done():
            yield _helper_answer(*waiting.popleft(), executor, admission)
    while waiting:
        if not waiting[0][1].done():
            # Rather than wait, take back the last chunk no helper has started (the database
            # takes a share of the cores, so the helpers may lag behind this thread).
            taken = next((i for i in range(len(waiting) - 1, 0, -1) if waiting[i][1].cancel()),
                         None)
            if taken is not None:
                part = waiting[taken][0]
                del waiting[taken]
                yield _admitted_here(part, admission)
                continue
        yield _helper_answer(*waiting.popleft(), executor, admission)


def _helper_answer(part: Sequence[tuple[int, Any]], future: Future[_AdmittedPart],
                   executor: ProcessPoolExecutor | None, admission: Admission) -> _AdmittedPart:
    """A helper's answer for ``part``; if the helper died, ``part`` admitted here."""
    try:
        answer = future.result()
    except (BrokenProcessPool, CancelledError):  # cancelled: the broken pool was shut down
        if executor is not None and _helpers.discard(executor):
            log.warning("an ingest helper process died; the batch's parts are admitted in "
                        "the API process and the helpers started afresh")
        return _admitted_here(part, admission)
    INGEST_ADMITTED.labels("helper").inc(len(part))
    return answer


def _admitted_here(items: Sequence[tuple[int, Any]], admission: Admission) -> _AdmittedPart:
    INGEST_ADMITTED.labels("request").inc(len(items))
    return admit_items(items, admission)


def _inline_outcome(item: TraceIn, policy: PolicyRef, admission: Admission) -> Label | None:
    o = item.outcome
    if o is None:
        return None
    # A redactor of its own: the row's is narrowed to what the trace's JSON may hold.
    return Label(trace_external_id=item.external_id, name=o.name,
                 value=redact_outcome_value(o.value, admission.redactor(policy)),
                 source=o.source, origin=OutcomeOrigin.inline, labelled_at=admission.now)


def store(session: Session, entries: Sequence[Admitted]) -> list[ItemResult]:
    """Write admitted traces in ``session``'s transaction and say what became of each, in the
    order given. ``entries`` may come from one batch or from many requests of many tenants (the
    group writer): the first occurrence of each (tenant, external_id) is inserted or judged
    against the stored row, and a repeat is judged against its first occurrence."""
    # Insert first (ON CONFLICT DO NOTHING RETURNING): new traces, the common case, then need no
    # lookup round trip. Whatever was not inserted already existed (or lost a race with a
    # concurrent request) and is classified against the stored row.
    firsts = _firsts(entries)
    inserted, awaited = _insert(session, firsts) if firsts else ({}, set())
    return settle(session, entries, inserted, awaited)


def _firsts(entries: Iterable[Admitted]) -> list[Admitted]:
    """The first entry of each (tenant, external_id), in order."""
    firsts: dict[tuple[str, str], Admitted] = {}
    for entry in entries:
        firsts.setdefault(entry.key, entry)
    return list(firsts.values())


def _judged(
    entries: Sequence[Admitted], firsts: dict[tuple[str, str], Admitted],
    inserted: dict[tuple[str, str], tuple[int, Split]],
    existing: dict[tuple[str, str], tuple[int, str, Split]],
) -> list[ItemResult]:
    """What became of each of ``entries``: the first of each key (``firsts``) created where it
    was ``inserted``, else judged against the stored row (``existing``); a repeat judged
    against its first occurrence."""
    judged: dict[tuple[str, str], ItemResult] = {}
    for key, first in firsts.items():
        ext = first.external_id
        if key in inserted:
            row_id, split = inserted[key]
            judged[key] = ItemResult(index=first.index, external_id=ext,
                                     status=ItemStatus.created, id=row_id, split=split)
            continue
        row_id, chash, split = existing[key]
        if chash == first.content_hash:
            judged[key] = ItemResult(index=first.index, external_id=ext,
                                     status=ItemStatus.duplicate, id=row_id, split=split)
        else:
            judged[key] = _conflict(first.index, ext, row_id)
    results: list[ItemResult] = []
    for entry in entries:
        first, base = firsts[entry.key], judged[entry.key]
        if entry is first:
            results.append(base)
        elif entry.content_hash == first.content_hash and base.status is not ItemStatus.conflict:
            results.append(ItemResult(index=entry.index, external_id=entry.external_id,
                                      status=ItemStatus.duplicate, id=base.id, split=base.split))
        else:
            results.append(_conflict(entry.index, entry.external_id, base.id or 0))
    return results


def settle(
    session: Session, entries: Sequence[Admitted],
    inserted: dict[tuple[str, str], tuple[int, Split]], awaited: set[tuple[str, str]],
) -> list[ItemResult]:
    """What became of each of ``entries`` once the first of each key was inserted where it was
    new (``inserted``; ``awaited``: those of them whose outcomes arrived first): the others are
    judged against the stored row, a repeat against its first occurrence; outcomes are written
    for the traces created."""
    firsts = {entry.key: entry for entry in _firsts(entries)}
    existing = _existing(session, [key for key in firsts if key not in inserted])
    results = _judged(entries, firsts, inserted, existing)

    # A retry never changes a stored outcome: only the traces created here write theirs.
    labels: dict[tuple[str, str], list[Label]] = {}
    for key, first in firsts.items():
        if first.outcome is not None and key in inserted:
            labels.setdefault((first.tenant, first.actor), []).append(
                replace(first.outcome, trace_id=inserted[key][0]))
    for (tenant, actor), tenant_labels in labels.items():
        set_outcomes(session, tenant, actor, tenant_labels)
    if awaited:
        _join_pending_outcomes(session, awaited)
    return results


def _validate(
    index: int, raw: Any, settings: Settings, generated_response: bool
) -> TraceIn | ItemResult:
    """The item, or its ``invalid`` result: refused strings, schema, limits, inline media."""
    hostile = _string_problems(raw, generated_response)
    if hostile:
        return hostile_item(index, raw, hostile)
    try:
        item = _trace_adapter.validate_python(raw)
    except ValidationError as exc:
        errs = [
            {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        return _invalid(index, raw, "the trace did not validate", errs)
    problem = _check_limits(item, settings)
    if problem:
        return _invalid(index, raw, problem)
    media = inline_media(item)
    if media:
        return _invalid(index, raw, media, type_="inline-media-unsupported",
                        title="Inline media is not stored")
    return item


_CONTENT_COLUMNS = ("messages", "response", "response_message", "request", "finish_reason",
                    "usage", "trainable", "untrainable_reason", "model", "snapshot_id",
                    "metadata", "redactions", "content_hash")


def fill_withheld_content(
    session: Session, principal: Principal, raw: Any, settings: Settings, *, reason: str,
    generated_response: bool = False,
) -> ItemResult:
    """Give a trace stored without its conversation (``untrainable_reason == reason``) the
    content that arrived after it — an OTLP span exported before the log events that carry
    its messages. Only such a trace changes (no rollout was ever made from it: it was not
    trainable); any other stored trace, or none, is left alone and answered ``duplicate``.
    ``generated_response`` as for :func:`ingest`."""
    checked = _validate(0, raw, settings, generated_response)
    if isinstance(checked, ItemResult):
        return checked
    row = session.scalar(select(Trace).where(
        Trace.tenant == principal.tenant, Trace.external_id == checked.external_id
    ).with_for_update())
    if row is None or row.untrainable_reason != reason:
        return ItemResult(index=0, external_id=checked.external_id, status=ItemStatus.duplicate,
                          id=row.id if row else None, split=row.split if row else None)
    policy = session.get(Policy, row.policy_id)
    assert policy is not None
    admission = prepare(session, principal, [raw], settings, untrainable=None,
                        generated_response=generated_response)
    values = _row_values(checked, PolicyRef(policy.id, policy.redaction_enabled),
                         content_hash(checked), untrainable_reason(checked), admission)
    session.execute(update(Trace).where(Trace.id == row.id).values(
        {getattr(Trace, "meta" if name == "metadata" else name): values[name]
         for name in _CONTENT_COLUMNS}))
    session.expire(row)
    return ItemResult(index=0, external_id=checked.external_id, status=ItemStatus.created,
                      id=row.id, split=row.split)


def _texts(item: TraceIn) -> Iterator[str]:
    for m in item.messages:
        if isinstance(m.content, str):
            yield m.content
        elif m.content:
            yield from (p.text for p in m.content if p.type == "text")
        for call in m.tool_calls or ():
            yield call.function.arguments
    if isinstance(item.response, str):
        yield item.response
    else:
        yield item.response.content or ""
        for call in item.response.tool_calls or ():
            yield call.function.arguments


def _check_limits(item: TraceIn, settings: Settings) -> str | None:
    longest = max(len(t) for t in _texts(item))
    if longest > settings.max_message_chars:
        return (
            f"a message or the response has {longest} characters; the limit is "
            f"{settings.max_message_chars}"
        )
    if _metadata_size_bound(item.metadata) <= settings.max_metadata_bytes:
        return None
    size = len(json.dumps(item.metadata, separators=(",", ":"), ensure_ascii=False))
    if size > settings.max_metadata_bytes:
        return f"metadata is {size} bytes; the limit is {settings.max_metadata_bytes}"
    return None


def _metadata_size_bound(metadata: dict[str, Any]) -> int:
    """At least the length of metadata's compact ``json.dumps``, from orjson's encoding (in C):
    the two agree but for numbers (a float's exponent padded, "Infinity" for null: at most five
    characters more a number), and a number takes a byte at least. Unbounded where orjson
    refuses the value (an integer beyond 64 bits, a key that is not a string)."""
    try:
        return 6 * len(orjson.dumps(metadata))
    except TypeError:
        return sys.maxsize


# Both caches follow the ``policies`` counter, which policy changes and snapshots' served names
# bump (``app.cache``). The policies are transient copies, never attached to a session: a cached
# instance is shared by concurrent requests, and a session's rollback would expire it under them.
_policies: GenerationCache[tuple[str, str], Policy] = GenerationCache("policies")
_snapshots_by_served_name: GenerationCache[str, tuple[tuple[int, int], ...]] = GenerationCache(
    "policies"
)
_POLICY_COLUMNS = [(attr.key, attr.columns[0]) for attr in Policy.__mapper__.column_attrs]


def _load_policies(
    session: Session, tenant: str, names: set[tuple[str, str]]
) -> dict[tuple[str, str], Policy]:
    rows = session.execute(select(*(column for _, column in _POLICY_COLUMNS)).where(
        Policy.tenant == tenant, Policy.name.in_([name for _, name in names])))
    copies = (Policy(**{key: row._mapping[column] for key, column in _POLICY_COLUMNS})
              for row in rows)
    return {(tenant, p.name): p for p in copies}


def _policies_by_name(session: Session, tenant: str, names: set[str]) -> dict[str, Policy]:
    if not names:
        return {}
    found = _policies.get_many(session, {(tenant, name) for name in names},
                               lambda missing: _load_policies(session, tenant, missing))
    return {name: policy for (_, name), policy in found.items()}


def _existing(
    session: Session, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int, str, Split]]:
    """The stored (id, content hash, split) of each (tenant, external_id): one query per tenant
    and chunk."""
    found: dict[tuple[str, str], tuple[int, str, Split]] = {}
    for tenant, external_ids in _by_tenant(keys):
        for chunk in _chunks(external_ids):
            rows = session.execute(
                select(Trace.external_id, Trace.id, Trace.content_hash, Trace.split).where(
                    Trace.tenant == tenant, Trace.external_id.in_(chunk)
                )
            )
            for ext, row_id, chash, split in rows:
                found[(tenant, ext)] = (row_id, chash, split)
    return found


def _load_served_snapshots(
    session: Session, names: set[str]
) -> dict[str, tuple[tuple[int, int], ...]]:
    rows = session.execute(
        select(Snapshot.policy_id, Snapshot.served_name, Snapshot.id).where(
            Snapshot.served_name.in_(names)
        )
    )
    found: dict[str, list[tuple[int, int]]] = {}
    for pid, name, sid in rows:
        found.setdefault(name, []).append((pid, sid))
    return {name: tuple(pairs) for name, pairs in found.items()}


def _served_snapshots(session: Session, names: set[str]) -> dict[tuple[int, str], int]:
    if not names:
        return {}
    found = _snapshots_by_served_name.get_many(
        session, names, lambda missing: _load_served_snapshots(session, missing))
    return {(pid, name): sid for name, pairs in found.items() for pid, sid in pairs}


# Whether an outcome is waiting for the row comes back with the insert, so the UPDATE that
# attaches it runs only when one is (rarely): a new trace costs one statement.
# Spelled out: SQLAlchemy renders RETURNING columns unqualified and would not correlate.
def _outcome_waiting_for(tenant: str, external_id: str) -> str:
    """SQL: whether an outcome that arrived before its trace waits for the trace named by the
    SQL expressions ``tenant`` and ``external_id``."""
    return (f"EXISTS (SELECT 1 FROM outcomes WHERE outcomes.tenant = {tenant}"
            f" AND outcomes.trace_external_id = {external_id} AND outcomes.trace_id IS NULL)")


_OUTCOME_WAITING = _outcome_waiting_for("traces.tenant", "traces.external_id")


def driver_error(exc: psycopg.Error, dialect: Dialect, invalidated: bool,
                 statement: str) -> StatementError:
    """psycopg's error from ``statement``, sent on a driver connection directly (pipeline mode,
    the group writer's own connection), as SQLAlchemy raises it from ``execute``: a dead
    database still answers 503."""
    return DBAPIError.instance(statement, None, exc, psycopg.Error,
                               hide_parameters=True, connection_invalidated=invalidated,
                               dialect=dialect)


@contextmanager
def _driver_errors(connection: Connection) -> Iterator[None]:
    """psycopg's errors, from statements sent on ``connection``'s driver connection directly,
    raised as ``driver_error``, the connection invalidated when the error says it is dead."""
    try:
        yield
    except psycopg.Error as exc:
        dead = connection.dialect.is_disconnect(
            cast(Any, exc), cast(Any, connection.connection.driver_connection), None)
        if dead:
            connection.invalidate(exc)
        raise driver_error(exc, connection.dialect, dead, _PIPELINED_INSERT) from exc


def store_under(
    session: Session, entries: Sequence[Admitted], expected: dict[str, int]
) -> list[ItemResult] | None:
    """``store``, in a transaction whose first statement reads the cache counters (Postgres):
    what ``store`` gives when they are ``expected``; else None, and the caller must roll the
    transaction back (its rows were inserted). The counters, the INSERT and the BEGIN before
    them go in one round trip (psycopg's pipeline mode), where reading the counters first took
    two more: the counters only move when a key, a policy or a served snapshot changes, so
    inserting before knowing them costs a rollback that rarely happens."""
    firsts = _firsts(entries)
    connection = session.connection()
    driver = cast("psycopg.Connection[Any]", connection.connection.driver_connection)
    with _driver_errors(connection):
        with driver.pipeline():
            counters_read = driver.cursor()
            counters_read.execute(COUNTERS_SQL)
            insert = driver.cursor()
            insert.execute(_PIPELINED_INSERT, (json_dumps([e.row for e in firsts]),))
        counters = accept_generations(session, counters_read.fetchall())
        returned = insert.fetchall()
    if counters != expected:
        return None
    inserted, awaited = _returned(returned)
    return settle(session, entries, inserted, awaited)


async def store_new(
    connection: psycopg.AsyncConnection[Any], entries: Sequence[Admitted],
    expected: dict[str, int] | None,
) -> list[ItemResult | None]:
    """``store`` on an async connection in autocommit, for the group writer on the event loop
    where no session can go: one statement (``GROUP_INSERT``) inserts every new row and
    commits, in one round trip, and only if the cache counters it reads in its own snapshot
    are ``expected`` (when given). Each entry's result, None for the entries only ``store`` on
    a session can write: an inline outcome, an outcome that arrived before its trace (that row
    is left out of the insert), or every entry when the counters have moved (nothing
    written). A row already stored costs one more statement, its lookup. psycopg's errors are
    raised as they are; the statement is all-or-nothing."""
    held = {entry.key for entry in entries if entry.outcome is not None}
    firsts = {entry.key: entry for entry in _firsts(entries) if entry.key not in held}
    inserted: dict[tuple[str, str], tuple[int, Split]] = {}
    if firsts:
        cursor = await connection.execute(GROUP_INSERT, {
            "rows": json_dumps([entry.row for entry in firsts.values()]),
            "expected": None if expected is None else json_dumps(expected)})
        answer = await cursor.fetchone()
        assert answer is not None  # an aggregate: always one row
        counters, returned = answer
        if expected is not None and counters != expected:
            return [None] * len(entries)
        inserted = {(tenant, ext): (row_id, Split(split))
                    for row_id, tenant, ext, split in returned or ()}
    existing: dict[tuple[str, str], tuple[int, str, Split]] = {}
    for tenant, external_ids in _by_tenant(key for key in firsts if key not in inserted):
        found = await connection.execute(_STORED_SQL, (tenant, external_ids))
        for ext, row_id, chash, split in await found.fetchall():
            existing[(tenant, ext)] = (row_id, chash, Split(split))
    # Neither inserted nor stored: its outcome is waiting for it (left out of the insert).
    written = {key: first for key, first in firsts.items()
               if key in inserted or key in existing}
    judged = iter(_judged([entry for entry in entries if entry.key in written], written,
                          inserted, existing))
    return [next(judged) if entry.key in written else None for entry in entries]


_WAITING_FOR_ROW = _outcome_waiting_for("r->>'tenant'", "r->>'external_id'")
GROUP_INSERT = (
    f"WITH counters AS ({COUNTERS_OBJECT_SQL}), inserted AS ("
    f"{json_array_insert_sql(Trace, '%(rows)s')}"
    " WHERE (CAST(%(expected)s AS jsonb) IS NULL"
    " OR (SELECT * FROM counters) = CAST(%(expected)s AS jsonb))"
    f" AND NOT {_WAITING_FOR_ROW}"
    " ON CONFLICT (tenant, external_id) DO NOTHING RETURNING id, tenant, external_id, split)"
    " SELECT (SELECT * FROM counters), (SELECT jsonb_agg(jsonb_build_array("
    "id, tenant, external_id, split)) FROM inserted)"
)
"""The group writer's statement: the new rows inserted, committed with it (autocommit), when
the counters read in the same snapshot are those expected (``%(expected)s``, JSON, or NULL
for no check) and no outcome is waiting for them; it answers the counters it read and the
rows inserted as ``[id, tenant, external_id, split]``."""


_STORED_SQL = ("SELECT external_id, id, content_hash, split FROM traces"
               " WHERE tenant = %s AND external_id = ANY(%s)")


def _by_tenant(keys: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    by: dict[str, list[str]] = {}
    for tenant, ext in keys:
        by.setdefault(tenant, []).append(ext)
    return list(by.items())


class OverlappedInsert:
    """Inserts a batch chunk by chunk while the caller makes the next chunk's rows: on Postgres
    each chunk's statement is sent in psycopg's pipeline mode and not waited for, so the
    database (on another core) parses and writes one chunk's JSON while Python redacts the
    next; on a 1,000-trace batch that hides most of the ~30 µs a row the statement costs. A
    helper thread would not do: under the GIL it waits up to a switch interval (5 ms) at every
    turn of the round trip while the caller computes. Statements queue on the connection
    (they run in the order sent) and their answers are read at the end of the ``with`` block,
    so ``send`` never waits for the database: chunks a helper process made arrive in bursts.
    The caller must not use the session between ``send`` and the end of the block. Only the
    first entry of each key is inserted, as ``store`` does; ``inserted`` and ``awaited`` are
    ``_insert``'s answers over all chunks. A database error is raised (as SQLAlchemy's, so a
    dead database still answers 503) by a later ``send`` or at the end of the block, and the
    transaction is then failed whole. Elsewhere than Postgres each chunk is inserted at
    once."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.inserted: dict[tuple[str, str], tuple[int, Split]] = {}
        self.awaited: set[tuple[str, str]] = set()
        self._sent: set[tuple[str, str]] = set()
        self._opened = False
        self._connection: Connection | None = None
        self._driver: psycopg.Connection[Any] | None = None
        self._pipeline: ExitStack | None = None  # holds the connection in pipeline mode
        self._in_flight: collections.deque[psycopg.Cursor[Any]] = collections.deque()

    def __enter__(self) -> OverlappedInsert:
        return self

    def _open(self) -> None:
        """Pipeline mode on the session's connection, at the first chunk to insert (a batch
        whose items were all refused takes no connection)."""
        self._opened = True
        connection = self.session.connection()
        if connection.dialect.name == "postgresql":
            self._connection = connection
            self._driver = cast("psycopg.Connection[Any]",
                                connection.connection.driver_connection)
            pipeline = ExitStack()
            with self._translated():
                pipeline.enter_context(self._driver.pipeline())
            self._pipeline = pipeline

    def send(self, entries: Sequence[Admitted]) -> None:
        fresh = [e for e in _firsts(entries) if e.key not in self._sent]
        if not fresh:
            return
        self._sent.update(e.key for e in fresh)
        if not self._opened:
            self._open()
        if self._driver is None:
            self._record(_insert(self.session, fresh))
            return
        with self._translated():
            cursor = self._driver.cursor()
            cursor.execute(_PIPELINED_INSERT, (json_dumps([e.row for e in fresh]),))
            self._in_flight.append(cursor)

    def _collect(self) -> None:
        while self._in_flight:
            self._record(_returned(self._in_flight.popleft().fetchall()))

    def _record(
        self, answer: tuple[dict[tuple[str, str], tuple[int, Split]], set[tuple[str, str]]]
    ) -> None:
        self.inserted.update(answer[0])
        self.awaited |= answer[1]

    @contextmanager
    def _translated(self) -> Iterator[None]:
        assert self._connection is not None
        with _driver_errors(self._connection):
            yield

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._pipeline is None:
            return
        pipeline, self._pipeline = self._pipeline, None
        if exc_type is None:
            try:
                with self._translated():
                    self._collect()
                    pipeline.close()
            except BaseException as error:
                # A statement failed: leave pipeline mode all the same, so the connection goes
                # back to the pool without the answers still queued on it.
                with suppress(psycopg.Error):
                    pipeline.__exit__(type(error), error, error.__traceback__)
                raise
            return
        # Already failing: leave pipeline mode without raising over the first error (the
        # transaction is rolled back whole by the session's owner).
        with suppress(psycopg.Error):
            pipeline.__exit__(exc_type, exc, traceback)


# Small enough that the last chunk, which nothing overlaps, is short; large enough that a
# statement's fixed cost (a round trip, the plan) stays small against its rows.
_OVERLAP_CHUNK = 128


def _insert(
    session: Session, entries: Sequence[Admitted]
) -> tuple[dict[tuple[str, str], tuple[int, Split]], set[tuple[str, str]]]:
    """The rows inserted by (tenant, external_id), and those of them whose outcomes arrived
    first."""
    rows = [entry.row for entry in entries]
    return _returned(_insert_postgres(session, rows)
                     if session.get_bind().dialect.name == "postgresql"
                     else _insert_portable(session, rows))


def _returned(
    returned: Iterable[Any],
) -> tuple[dict[tuple[str, str], tuple[int, Split]], set[tuple[str, str]]]:
    """What an insert's RETURNING says: the rows inserted by (tenant, external_id), and those
    of them whose outcomes arrived first."""
    out: dict[tuple[str, str], tuple[int, Split]] = {}
    awaited: set[tuple[str, str]] = set()
    for row_id, tenant, ext, split, waiting in returned:
        out[(tenant, ext)] = (row_id, Split(split))
        if waiting:
            awaited.add((tenant, ext))
    return out, awaited


def _insert_portable(session: Session, rows: list[dict[str, Any]]) -> Iterator[Any]:
    """SQLite: one cached statement, the rows as executemany parameters (multi-row INSERTs)."""
    table = Trace.__table__
    stmt = (
        upsert_insert(session, table)
        .on_conflict_do_nothing(index_elements=["tenant", "external_id"])
        .returning(table.c.id, table.c.tenant, table.c.external_id, table.c.split,
                   literal_column(_OUTCOME_WAITING, Boolean()))
    )
    for chunk in _chunks(rows):
        yield from session.execute(stmt, list(chunk))


def _postgres_insert_sql(parameter: str = ":rows") -> str:
    return (
        f"{json_array_insert_sql(Trace, parameter)} "
        "ON CONFLICT (tenant, external_id) DO NOTHING "
        f"RETURNING id, tenant, external_id, split, {_OUTCOME_WAITING}"
    )


_POSTGRES_INSERT = text(_postgres_insert_sql())
_PIPELINED_INSERT = _postgres_insert_sql("%s")  # psycopg's own placeholder


def _insert_postgres(session: Session, rows: list[dict[str, Any]]) -> list[Any]:
    """Postgres: all rows as one JSON array parameter of one short statement
    (``json_array_insert_sql``; a multi-row VALUES was a quarter of a 1,000-trace batch)."""
    return execute_json_array(session, _POSTGRES_INSERT, rows)


def _row_values(
    item: TraceIn, policy: PolicyRef, chash: str, untrainable: str | None, admission: Admission,
) -> dict[str, Any]:
    """The ``traces`` row of a validated item: redacted as its policy says."""
    redactor = admission.redactor(policy)
    messages = dump_messages(item)
    response, metadata = _dump_response(item), item.metadata
    # Most traces leave few detectors, or none, to run on their strings.
    if redactor is not None and redactor.narrow_to([messages, response, metadata]):
        messages = redactor.messages(messages)
        response = (redactor.text(response) if isinstance(response, str)
                    else redactor.message(response))
        metadata = redactor.value(metadata)
    request = {
        name: getattr(item, name) if name in ("tool_choice", "parallel_tool_calls")
        else _dump(getattr(item, name))
        for name in _REQUEST_FIELDS if name in item.model_fields_set
    }
    return {
        "tenant": admission.tenant,
        "external_id": item.external_id,
        "policy_id": policy.id,
        "messages": messages,
        "response": response if isinstance(response, str)
        else response.get("content") or "",
        "response_message": None if isinstance(response, str) else response,
        "request": request,
        "finish_reason": item.finish_reason,
        "usage": _dump(item.usage),
        "tags": item.tags,
        "user_id": item.user_id,
        "session_id": item.session_id,
        "trainable": untrainable is None,
        "untrainable_reason": untrainable,
        "model": item.model,
        "snapshot_id": admission.snapshots.get((policy.id, item.model or "")),
        "metadata": metadata,
        "split": assign_split(admission.tenant, item.external_id,
                              admission.settings.heldout_fraction),
        "redactions": _redaction_record(redactor),
        "content_hash": chash,
        "occurred_at": item.occurred_at,
        "created_at": admission.now,
    }


def _redaction_record(redactor: Redactor | None) -> dict[str, Any]:
    """What the trace keeps about its redaction: counts per kind, and the mode when it is not
    the default (``hash``), so a reader knows the tokens are linkable."""
    if redactor is None:
        return {"disabled": True}
    counts: dict[str, Any] = dict(redactor.counts)
    if redactor.mode is RedactionMode.hash:
        counts["mode"] = RedactionMode.hash.value
    return counts


def _dump(value: Any) -> Any:
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_unset=True)
    return value


def redact_outcome_value(value: Any, redactor: Redactor | None) -> Any:
    """An outcome's string value is free text too (a reviewer's note): redacted like messages."""
    return redactor.text(value) if redactor is not None and isinstance(value, str) else value


def outcome_redactor(session: Session, tenant: str) -> Redactor | None:
    """The redactor for outcomes that may arrive before their trace (and so before their policy
    is known): the tenant's mode, when any of the tenant's policies redacts."""
    mode = tenants.redaction_mode(session, tenant)
    if mode is RedactionMode.off or not session.scalar(select(exists().where(
            Policy.tenant == tenant, Policy.redaction_enabled.is_(True)))):
        return None
    return tenants.redactor(mode, tenant)


def _join_pending_outcomes(session: Session, keys: set[tuple[str, str]]) -> None:
    """Attach outcomes that arrived before their trace (and inline ones) to the new rows."""
    # One UPDATE per tenant and chunk (no SELECT, no per-row round trip): the trace id comes
    # from a correlated subquery on (tenant, external_id), which is unique.
    trace_id = (
        select(Trace.id)
        .where(Trace.tenant == Outcome.tenant, Trace.external_id == Outcome.trace_external_id)
        .scalar_subquery()
    )
    by_tenant: dict[str, list[str]] = {}
    for tenant, ext in sorted(keys):
        by_tenant.setdefault(tenant, []).append(ext)
    for tenant, external_ids in by_tenant.items():
        for chunk in _chunks(external_ids):
            session.execute(
                update(Outcome)
                .where(
                    Outcome.tenant == tenant,
                    Outcome.trace_external_id.in_(chunk),
                    Outcome.trace_id.is_(None),
                )
                .values(trace_id=trace_id)
                .execution_options(synchronize_session=False)
            )


def to_out(trace: Trace, policy_name: str) -> TraceOut:
    sent = {name: trace.request[name] for name in _REQUEST_FIELDS if name in trace.request}
    return TraceOut(
        id=trace.id,
        external_id=trace.external_id,
        policy=policy_name,
        messages=trace.messages,
        **sent,
        response=trace.response_message if trace.response_message is not None
        else trace.response,
        finish_reason=trace.finish_reason,
        usage=trace.usage,
        model=trace.model,
        tags=trace.tags,
        user_id=trace.user_id,
        session_id=trace.session_id,
        trainable=trace.trainable,
        untrainable_reason=trace.untrainable_reason,
        snapshot_id=trace.snapshot_id,
        metadata=trace.meta,
        split=trace.split,
        redactions=trace.redactions,
        outcomes=[
            OutcomeOut(name=o.name, value=o.value, source=o.source, origin=o.origin,
                       labelled_at=o.labelled_at, updated_at=o.updated_at)
            for o in trace.outcomes
        ],
        occurred_at=trace.occurred_at,
        created_at=trace.created_at,
    )


def get_trace(session: Session, tenant: str, trace_id: int) -> TraceOut:
    row = session.execute(
        select(Trace, Policy.name)
        .join(Policy, Policy.id == Trace.policy_id)
        .where(Trace.id == trace_id, Trace.tenant == tenant)
    ).first()
    if row is None:
        raise NotFound(f"no trace with id {trace_id}")
    return to_out(row[0], row[1])


def find(session: Session, tenant: str, external_id: str) -> Trace | None:
    return session.scalar(
        select(Trace).where(Trace.tenant == tenant, Trace.external_id == external_id)
    )


def stored_external_ids(session: Session, tenant: str, external_ids: list[str]) -> set[str]:
    """Which of ``external_ids`` the tenant already has (ids no database could hold are not)."""
    storable = [e for e in external_ids if string_problem(e) is None]
    found: set[str] = set()
    for chunk in _chunks(storable):
        found.update(session.scalars(select(Trace.external_id).where(
            Trace.tenant == tenant, Trace.external_id.in_(chunk))))
    return found


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode()).decode()
        prefix, value = text.split(":", 1)
        if prefix != "id":
            raise ValueError(prefix)
        return int(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not one this API returned") from exc


def list_traces(
    session: Session,
    tenant: str,
    *,
    policy: str | None,
    external_id: str | None = None,
    split: Split | None,
    has_outcome: bool | None,
    since: datetime | None,
    until: datetime | None,
    cursor: str | None,
    limit: int,
) -> TracePage:
    q = (
        select(Trace, Policy.name)
        .join(Policy, Policy.id == Trace.policy_id)
        .where(Trace.tenant == tenant)
        .order_by(Trace.id)
        .limit(limit + 1)
    )
    if policy is not None:
        q = q.where(Policy.name == policy)
    if external_id is not None:
        q = q.where(Trace.external_id == external_id)
    if split is not None:
        q = q.where(Trace.split == split)
    if has_outcome is not None:
        cond = exists().where(Outcome.trace_id == Trace.id)
        q = q.where(cond if has_outcome else ~cond)
    if since is not None:
        q = q.where(Trace.created_at >= since)
    if until is not None:
        q = q.where(Trace.created_at < until)
    if cursor:
        q = q.where(Trace.id > decode_cursor(cursor))
    rows = session.execute(q).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1][0].id) if len(rows) > limit else None
    return TracePage(items=[to_out(t, name) for t, name in page], next_cursor=next_cursor)


def delete_trace(
    session: Session, principal: Principal, trace_id: int, reason: str | None = None
) -> DeletedTrace:
    trace = session.scalar(
        select(Trace).where(Trace.id == trace_id, Trace.tenant == principal.tenant)
    )
    if trace is None:
        raise NotFound(f"no trace with id {trace_id}")
    group_ids = list(
        session.scalars(select(RolloutGroup.id).where(RolloutGroup.trace_id == trace_id))
    )
    run_ids: list[int] = []
    rollouts = 0
    if group_ids:
        run_ids = sorted(
            set(
                session.scalars(
                    select(training_run_groups.c.training_run_id).where(
                        training_run_groups.c.group_id.in_(group_ids)
                    )
                )
            )
        )
        rollouts = (
            session.scalar(
                select(func.count()).select_from(Rollout).where(Rollout.group_id.in_(group_ids))
            )
            or 0
        )
        session.execute(delete(Rollout).where(Rollout.group_id.in_(group_ids)))
        session.execute(delete(RolloutGroup).where(RolloutGroup.id.in_(group_ids)))
    snapshot_ids: list[int] = []
    if run_ids:
        outputs = session.scalars(
            select(TrainingRun.output_snapshot_id).where(TrainingRun.id.in_(run_ids))
        )
        snapshot_ids = sorted({sid for sid in outputs if sid is not None})
    record(
        session,
        principal.tenant,
        principal.actor,
        "trace.delete",
        "trace",
        trace_id,
        before={
            "external_id": trace.external_id,
            "policy_id": trace.policy_id,
            "group_ids": group_ids,
        },
        after={
            "training_run_ids": run_ids,
            "adapter_snapshot_ids": snapshot_ids,
            "rollouts_deleted": rollouts,
        },
        reason=reason,
    )
    session.execute(delete(Outcome).where(Outcome.trace_id == trace_id))
    session.delete(trace)
    return DeletedTrace(
        id=trace_id, deleted=True, rollouts_deleted=rollouts, training_run_ids=run_ids
    )
