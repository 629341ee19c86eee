"""OTLP trace exports onto our traces: decode the request, map each GenAI span, ingest through the
traces service (the one ingest path), turn evaluation events into outcomes.

An OTLP exporter retries a whole request on a retryable status and drops it on any other, so the
answer is per span: every span we cannot store is counted in ``partial_success.rejected_spans``
with a reason in ``error_message``; the rest of the request is stored. Spans that are not model
calls are acknowledged and skipped (not rejected: nothing is wrong with them).

Which policy a span belongs to: the ``tracelearn.policy`` attribute on the span or its resource,
else a policy named like the response or request model.

OTLP/JSON differs from protobuf's JSON mapping in one place: trace and span ids are hex, not
base64; ``decode`` translates them before handing the body to ``json_format``. A span whose
strings cannot be stored (lone surrogates, NUL, control characters) is rejected on its own;
protobuf bodies cannot even carry a lone surrogate (invalid UTF-8 fails the whole decode: 400).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.service import Principal
from app.db import utcnow
from app.errors import DomainError, InvalidInput, PayloadTooLarge, printable
from app.models import OutcomeOrigin, OutcomeSource, Policy
from app.receivers.otlp import staging
from app.receivers.otlp.mapping import (
    CONTENT_NOT_CAPTURED,
    CONVERSATION_EVENTS,
    Evaluation,
    EventView,
    MappedSpan,
    SpanRejected,
    SpanView,
    attributes,
    evaluations,
    map_span,
    plain,
    skip_reason,
    view,
)
from app.settings import Settings
from app.traces import service as traces
from app.traces.outcomes import Label, label_time, set_outcomes
from app.traces.strings import describe, string_problems

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_MAX_REASONS = 10


class UndecodableRequest(InvalidInput):
    status, type, title = 400, "undecodable-otlp", "Undecodable OTLP request"


class UnsupportedEncoding(DomainError):
    status, type, title = 415, "unsupported-media-type", "Unsupported media type"


@dataclass
class ExportResult:
    accepted: int = 0
    skipped: int = 0
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)
    trace_ids: list[int] = field(default_factory=list)

    def reject(self, span: str, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < _MAX_REASONS:
            self.reasons.append(printable(f"span {span}: {reason}"))

    @property
    def error_message(self) -> str:
        more = self.rejected - len(self.reasons)
        return "; ".join(self.reasons) + (f"; and {more} more" if more > 0 else "")

    def response(self) -> ExportTraceServiceResponse:
        answer = ExportTraceServiceResponse()
        if self.rejected:
            answer.partial_success.rejected_spans = self.rejected
            answer.partial_success.error_message = self.error_message
        return answer

    def logs_response(self) -> ExportLogsServiceResponse:
        answer = ExportLogsServiceResponse()
        if self.rejected:
            answer.partial_success.rejected_log_records = self.rejected
            answer.partial_success.error_message = self.error_message
        return answer


@dataclass(frozen=True)
class Signal:
    """Where an OTLP/JSON request keeps its items (the two spellings protobuf's JSON accepts)."""

    message: type[Message]
    resources: tuple[str, str]
    scopes: tuple[str, str]
    items: tuple[str, ...]
    noun: str


TRACES = Signal(ExportTraceServiceRequest, ("resourceSpans", "resource_spans"),
                ("scopeSpans", "scope_spans"), ("spans",), "span")
LOGS = Signal(ExportLogsServiceRequest, ("resourceLogs", "resource_logs"),
              ("scopeLogs", "scope_logs"), ("logRecords", "log_records"), "log record")


# ------------------------------------------------------------------------------------- decoding

def media_type(content_type: str) -> str | None:
    """The OTLP encoding a Content-Type names (None: neither protobuf nor JSON)."""
    kind = content_type.split(";")[0].strip().lower()
    return kind if kind in (PROTOBUF, JSON) else None


def media_type_of(content_type: str) -> str:
    kind = media_type(content_type)
    if kind is None:
        raise UnsupportedEncoding(f"send OTLP as {PROTOBUF} or {JSON}, not {content_type!r}")
    return kind


def decompress(body: bytes, content_encoding: str, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding: gzip``, refused past ``limit`` bytes (a small
    compressed body can expand without bound)."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported (gzip is)")
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise UndecodableRequest("the body is not valid gzip") from exc
    if len(out) > limit:
        raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes")
    return out


def decode(body: bytes, kind: str, result: ExportResult, signal: Signal = TRACES) -> Any:
    """The request; for JSON, items holding refused strings are left out and counted in
    ``result`` (so one hostile span does not sink the others)."""
    request = signal.message()
    if kind == PROTOBUF:
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise UndecodableRequest(f"the body is not an {signal.message.__name__}: {exc}"
                                     ) from exc
        return request
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise UndecodableRequest("the body is not JSON") from exc
    if not isinstance(raw, dict):
        raise UndecodableRequest(f"an OTLP/JSON body is an {signal.message.__name__} object")
    try:
        json_format.ParseDict(_storable_json(raw, result, signal), request,
                              ignore_unknown_fields=True)
    except (json_format.ParseError, binascii.Error, TypeError, ValueError) as exc:
        raise UndecodableRequest(printable(
            f"not an OTLP/JSON {signal.message.__name__}: {exc}")) from exc
    return request


def _storable_json(raw: dict[str, Any], result: ExportResult, signal: Signal) -> dict[str, Any]:
    for resource in _items(raw, *signal.resources):
        for scope in _items(resource, *signal.scopes):
            key = next((k for k in signal.items if isinstance(scope.get(k), list)), None)
            if key is None:
                continue
            kept = []
            for item in _items(scope, key):
                problems = string_problems([resource.get("resource"), scope.get("scope"), item],
                                           allow_controls=True)
                if problems:
                    result.reject(_hex_id(item), f"a refused string: {describe(problems)}")
                    continue
                try:
                    kept.append(_base64_ids(item))
                except ValueError:
                    result.reject(_hex_id(item), "trace and span ids are hex strings")
            scope[key] = kept
    return raw


def _items(obj: Any, *keys: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    for key in keys:
        value = obj.get(key)
        if isinstance(value, list):
            return [v for v in value if isinstance(v, dict)]
    return []


def _hex_id(item: dict[str, Any]) -> str:
    value = item.get("spanId", item.get("span_id"))
    return printable(value)[:32] if isinstance(value, str) else "?"


def _base64_ids(span: dict[str, Any]) -> dict[str, Any]:
    """OTLP/JSON spells ids in hex; protobuf's JSON mapping reads bytes as base64."""
    out = dict(span)
    for key in ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id"):
        if isinstance(out.get(key), str):
            out[key] = base64.b64encode(bytes.fromhex(out[key])).decode()
    links = []
    for link in span.get("links") or []:
        link = dict(link) if isinstance(link, dict) else {}
        for key in ("traceId", "trace_id", "spanId", "span_id"):
            if isinstance(link.get(key), str):
                link[key] = base64.b64encode(bytes.fromhex(link[key])).decode()
        links.append(link)
    if links:
        out["links"] = links
    return out


# google.rpc.Code for the HTTP statuses a receiver answers (OTLP/HTTP: the body of a 4xx or 5xx
# is a google.rpc.Status; its code is informative, the HTTP status decides the retry).
_RPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 413: 8, 415: 3, 422: 3, 429: 8, 503: 14}


def error_media_type(content_type: str) -> str:
    """The encoding of an error answer: JSON for a JSON request, protobuf otherwise (what the
    specification's default exporters send)."""
    return media_type(content_type) or PROTOBUF


def error_status(http_status: int, message: str, kind: str) -> bytes:
    """A ``google.rpc.Status`` for a refused request, in encoding ``kind``."""
    status = RpcStatus(code=_RPC_CODES.get(http_status, 13 if http_status >= 500 else 2),
                       message=printable(message))
    return encode(status, kind)


def encode(message: Message, kind: str) -> bytes:
    if kind == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


# -------------------------------------------------------------------------------------- ingest

def receive(
    session: Session, principal: Principal, body: bytes, content_type: str,
    content_encoding: str, settings: Settings, signal: Signal = TRACES,
) -> tuple[bytes, str]:
    """One OTLP/HTTP export request, traces or logs, from raw body to the encoded answer (in
    the request's own encoding) and its media type."""
    kind = media_type_of(content_type)
    body = decompress(body, content_encoding, settings.max_body_bytes)
    result = ExportResult()
    export = decode(body, kind, result, signal)
    if signal is LOGS:
        answer: Message = ingest_logs(session, principal, export, settings, result).logs_response()
    else:
        answer = ingest_request(session, principal, export, settings, result).response()
    return encode(answer, kind), kind


def spans(request: ExportTraceServiceRequest) -> Iterator[SpanView]:
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield view(span, resource)


def ingest_request(
    session: Session, principal: Principal, request: ExportTraceServiceRequest,
    settings: Settings, result: ExportResult | None = None,
) -> ExportResult:
    result = result or ExportResult()
    mapped: list[tuple[SpanView, MappedSpan]] = []
    for span in spans(request):
        problem = _unstorable(span)
        if problem:
            result.reject(span.span_id, problem)
            continue
        if skip_reason(span) is not None:
            result.skipped += 1
            continue
        early = staging.events_for(session, principal.tenant, span.external_id)
        if early:  # log events exported before their span
            span = dataclasses.replace(span, events=[*span.events, *early])
        try:
            mapped.append((span, map_span(span)))
        except SpanRejected as exc:
            result.reject(span.span_id, str(exc))
    known = _policy_names(session, principal.tenant, mapped)
    groups: dict[str | None, list[tuple[SpanView, MappedSpan]]] = {}
    for span, m in mapped:
        policy = m.policy_hint or next((name for name in m.models if name in known), None)
        if policy is None:
            result.reject(span.span_id, "cannot tell which policy this span belongs to: set the "
                          "`tracelearn.policy` attribute on the span or its resource, or name "
                          "the policy as the model")
            continue
        m.item["policy"] = policy
        groups.setdefault(m.untrainable, []).append((span, m))
    labels: list[Label] = []
    for untrainable, group in groups.items():
        for start in range(0, len(group), settings.max_batch_items):
            chunk = group[start:start + settings.max_batch_items]
            batch = traces.ingest(session, principal, [m.item for _, m in chunk], settings,
                                  untrainable=untrainable, generated_response=True)
            for (span, m), item in zip(chunk, batch.results, strict=True):
                if item.id is None or item.status.value not in ("created", "duplicate"):
                    error = item.error or {}
                    result.reject(span.span_id, str(error.get("detail", item.status.value)))
                    continue
                result.accepted += 1
                result.trace_ids.append(item.id)
                labels.extend(_labels(session, principal, m.item["external_id"],
                                      m.evaluations, item.id))
                if untrainable == CONTENT_NOT_CAPTURED:
                    staging.keep_span(session, principal.tenant, span, item.id)
    set_outcomes(session, principal.tenant, principal.actor, labels)
    return result


def _unstorable(span: SpanView) -> str | None:
    """What no row can hold (NUL, lone surrogates). Other control characters pass here: a
    model's answer may hold them as it wrote them, and ``traces.ingest`` refuses them
    everywhere but in the response."""
    strings = span.strings()
    problems = string_problems(strings, allow_controls=True)
    if problems:
        return f"a refused string: {describe(problems)}"
    if _non_finite(strings):
        return "a non-finite number (NaN or infinity) in an attribute"
    return None


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


def _policy_names(
    session: Session, tenant: str, mapped: list[tuple[SpanView, MappedSpan]]
) -> set[str]:
    models = {name for _, m in mapped if m.policy_hint is None for name in m.models}
    if not models:
        return set()
    return set(session.scalars(select(Policy.name).where(Policy.tenant == tenant,
                                                         Policy.name.in_(models))))


def _labels(
    session: Session, principal: Principal, external_id: str, found: list[Evaluation],
    trace_id: int,
) -> list[Label]:
    """An evaluation is an explicit label (feedback origin): it outranks an inline outcome."""
    if not found:
        return []
    redactor = traces.outcome_redactor(session, principal.tenant)
    now = utcnow()
    return [Label(trace_external_id=external_id, name=e.name,
                  value=traces.redact_outcome_value(e.value, redactor),
                  source=OutcomeSource.eval, origin=OutcomeOrigin.feedback,
                  labelled_at=label_time(e.labelled_at, now), trace_id=trace_id)
            for e in found]


# ---------------------------------------------------------------------------------- log events

def ingest_logs(
    session: Session, principal: Principal, request: ExportLogsServiceRequest,
    settings: Settings, result: ExportResult | None = None,
) -> ExportResult:
    """GenAI events exported as log records: kept for their span, merged into it when it
    arrives, or filling in the trace of a span stored without content; evaluation results
    label a stored trace at once. Other log records are acknowledged and skipped."""
    result = result or ExportResult()
    by_span: dict[str, list[EventView]] = {}
    for resource_logs in request.resource_logs:
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                attrs = attributes(record.attributes)
                name = record.event_name or attrs.get("event.name")
                if name not in CONVERSATION_EVENTS:
                    result.skipped += 1
                    continue
                if len(record.trace_id) != 16 or len(record.span_id) != 8:
                    result.reject("?", f"a {name} log record needs its span's trace and span id")
                    continue
                body = plain(record.body)
                event = EventView(str(name), record.time_unix_nano or record.observed_time_unix_nano,
                                  attrs | ({"body": body} if body is not None else {}))
                span_id = record.span_id.hex()
                problems = string_problems({"name": event.name, "attributes": event.attributes},
                                           allow_controls=True)
                if problems:
                    result.reject(span_id, f"a refused string: {describe(problems)}")
                    continue
                if _non_finite(event.attributes):
                    result.reject(span_id, "a non-finite number (NaN or infinity)")
                    continue
                by_span.setdefault(f"otel-{record.trace_id.hex()}-{span_id}", []).append(event)
    labels: list[Label] = []
    for external_id, events in by_span.items():
        every = staging.add_events(session, principal.tenant, external_id, events)
        result.accepted += len(events)
        span = staging.kept_span(session, principal.tenant, external_id)
        if span is not None:
            labels.extend(_fill(session, principal, dataclasses.replace(
                span, events=[*span.events, *every]), settings, result))
            continue
        stored = traces.find(session, principal.tenant, external_id)
        if stored is not None:
            labels.extend(_labels(session, principal, external_id, evaluations(events),
                                  stored.id))
    set_outcomes(session, principal.tenant, principal.actor, labels)
    return result


def _fill(
    session: Session, principal: Principal, span: SpanView, settings: Settings,
    result: ExportResult,
) -> list[Label]:
    """The stored content-less trace of ``span``, filled in once its events bring content."""
    try:
        m = map_span(span)
    except SpanRejected as exc:
        result.reject(span.span_id, str(exc))
        return []
    stored = traces.find(session, principal.tenant, span.external_id)
    if stored is None:
        return []
    if m.untrainable is None:
        policy = session.get(Policy, stored.policy_id)
        assert policy is not None
        answer = traces.fill_withheld_content(
            session, principal, m.item | {"policy": policy.name}, settings,
            reason=CONTENT_NOT_CAPTURED, generated_response=True)
        if answer.status.value == "invalid":
            result.reject(span.span_id, str((answer.error or {}).get("detail", "")))
            return []
    return _labels(session, principal, span.external_id, m.evaluations, stored.id)
