"""Import a file of traces in the formats teams already have, export ours for other tools.

Import goes through the same services as HTTP ingest — the traces service for OpenAI JSONL, the
Langfuse receiver's for a Langfuse event file, the OTLP receiver's for OTLP/JSON — so a record
imported is validated, redacted and stored exactly as if it had been posted.

    openai-jsonl  one conversation a line (OpenAI fine-tuning format; app/transfer/openai_jsonl)
    langfuse      Langfuse ingestion events, one a line (or a JSON file `{"batch": [...]}`)
    otlp-json     OTLP/JSON export requests, one a line (the OTel Collector's file exporter
                  writes this; traces, and logs for GenAI events sent as log records), or one
                  request in a `.json` file

Idempotent and resumable: every record has a stable external id, each batch is committed on its
own, and an OpenAI JSONL line already stored is skipped before it is validated again — an
interrupted import is resumed by running it again, and a second run adds nothing.

Export writes every trace of a tenant (or one policy) with its outcomes and its graded rollout
groups (reference snapshot, each rollout's text and reward): OpenAI JSONL (what `import` reads
back) or Parquet (one row per trace, nested values as JSON text). The file appears only when
complete (written aside, then renamed).
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth.service import Principal, Scope
from app.db import Database
from app.errors import DomainError, printable
from app.models import GroupStatus, Policy, RolloutGroup, Snapshot, Trace
from app.receivers.langfuse import service as langfuse
from app.receivers.otlp import service as otlp
from app.settings import Settings
from app.traces import service as traces
from app.traces.schemas import TraceOut
from app.transfer import openai_jsonl

Progress = Callable[[int, int], None]
"""progress(done, total)."""
_MAX_PROBLEMS = 20


class ImportFormat(enum.StrEnum):
    openai_jsonl = "openai-jsonl"
    langfuse = "langfuse"
    otlp_json = "otlp-json"


class ExportFormat(enum.StrEnum):
    openai_jsonl = "openai-jsonl"
    parquet = "parquet"


@dataclass(frozen=True)
class OperatorPrincipal(Principal):
    """A person at the command line acting inside one tenant; audit rows name the command."""

    @property
    def actor(self) -> str:
        return f"cli:{self.name}"


def operator(tenant: str, command: str) -> Principal:
    return OperatorPrincipal(key_id=0, tenant=tenant, scopes=frozenset({Scope.ingest}),
                             name=command)


@dataclass
class ImportReport:
    records: int = 0
    created: int = 0
    already_stored: int = 0
    skipped: int = 0
    rejected: int = 0
    problems: list[str] = field(default_factory=list)

    def reject(self, where: str, why: str) -> None:
        self.rejected += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(printable(f"{where}: {why}"))


@dataclass
class _Record:
    where: str  # "line 12", for the report
    value: Any


def import_file(
    database: Database, principal: Principal, path: Path, fmt: ImportFormat, settings: Settings,
    *, policy: str | None = None, batch_size: int = 500, progress: Progress | None = None,
) -> ImportReport:
    report = ImportReport()
    records = list(_read(path, report))
    if fmt is ImportFormat.langfuse:
        records = list(_langfuse_events(records))
    total = len(records)
    batch_size = max(1, min(batch_size, settings.max_batch_items))
    for start in range(0, total, batch_size):
        batch = records[start:start + batch_size]
        with database.session() as session:
            if fmt is ImportFormat.openai_jsonl:
                _import_openai(session, principal, batch, settings, policy, report)
            elif fmt is ImportFormat.langfuse:
                _import_langfuse(session, principal, batch, settings, report)
            else:
                _import_otlp(session, principal, batch, settings, report)
        if progress:
            progress(min(start + batch_size, total), total)
    report.records = total
    return report


def _read(path: Path, report: ImportReport) -> Iterator[_Record]:
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    if path.suffix == ".json":
        try:
            yield _Record("file", json.loads(text))
        except ValueError as exc:
            report.reject("file", f"not JSON: {exc}")
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield _Record(f"line {number}", json.loads(line))
        except ValueError as exc:
            report.reject(f"line {number}", f"not JSON: {exc}")


def _import_openai(
    session: Session, principal: Principal, batch: list[_Record], settings: Settings,
    policy: str | None, report: ImportReport,
) -> None:
    items: dict[str | None, list[tuple[_Record, dict[str, Any]]]] = {}
    for record in batch:
        try:
            item, untrainable = openai_jsonl.to_item(record.value, policy)
        except openai_jsonl.LineRejected as exc:
            report.reject(record.where, str(exc))
            continue
        items.setdefault(untrainable, []).append((record, item))
    stored = traces.stored_external_ids(
        session, principal.tenant, [item["external_id"] for group in items.values()
                                    for _, item in group])
    for untrainable, group in items.items():
        new = [(r, item) for r, item in group if item["external_id"] not in stored]
        report.already_stored += len(group) - len(new)
        if not new:
            continue
        result = traces.ingest(session, principal, [item for _, item in new], settings,
                               untrainable=untrainable)
        for (record, _), answer in zip(new, result.results, strict=True):
            if answer.status.value == "created":
                report.created += 1
            elif answer.status.value == "duplicate":
                report.already_stored += 1
            else:
                report.reject(record.where, str((answer.error or {}).get("detail", "")))


def _langfuse_events(records: list[_Record]) -> Iterator[_Record]:
    for record in records:
        value = record.value
        if isinstance(value, dict) and isinstance(value.get("batch"), list):
            for i, event in enumerate(value["batch"]):
                yield _Record(f"{record.where}, event {i}", event)
        else:
            yield record


def _import_langfuse(
    session: Session, principal: Principal, batch: list[_Record], settings: Settings,
    report: ImportReport,
) -> None:
    result = langfuse.ingest_batch(session, principal, [r.value for r in batch], settings)
    report.created += len(result.successes)
    where = {printable(str(r.value.get("id"))) if isinstance(r.value, dict) else "": r.where
             for r in batch}
    for error in result.errors:
        report.reject(where.get(error.id, error.id), error.message)


def _import_otlp(
    session: Session, principal: Principal, batch: list[_Record], settings: Settings,
    report: ImportReport,
) -> None:
    """Each record is a traces request (``resourceSpans``) or a logs request (``resourceLogs``,
    the collector's logs file: GenAI events joining their spans)."""
    for record in batch:
        result = otlp.ExportResult()
        is_logs = isinstance(record.value, dict) and (
            "resourceLogs" in record.value or "resource_logs" in record.value)
        signal = otlp.LOGS if is_logs else otlp.TRACES
        try:
            request = otlp.decode(json.dumps(record.value).encode(), otlp.JSON, result, signal)
        except DomainError as exc:
            report.reject(record.where, exc.detail)
            continue
        ingest = otlp.ingest_logs if is_logs else otlp.ingest_request
        result = ingest(session, principal, request, settings, result)
        report.created += result.accepted
        report.skipped += result.skipped
        if result.rejected:
            report.rejected += result.rejected
            if len(report.problems) < _MAX_PROBLEMS:
                report.problems.append(f"{record.where}: {result.error_message}")


# ------------------------------------------------------------------------------------- export

def export_file(
    database: Database, tenant: str, path: Path, fmt: ExportFormat, *,
    policy: str | None = None, bare: bool = False, page_size: int = 500,
    progress: Progress | None = None,
) -> int:
    """Write every trace of ``tenant`` (of ``policy``, if given) to ``path``; returns how many."""
    partial = path.with_name(f".{path.name}.partial")
    total = _count(database, tenant, policy)
    written = 0
    try:
        if fmt is ExportFormat.openai_jsonl:
            with partial.open("w", encoding="utf-8") as out:
                for page in _pages(database, tenant, policy, page_size):
                    out.writelines(
                        json.dumps(openai_jsonl.from_trace(trace, groups, bare),
                                   ensure_ascii=False) + "\n" for trace, groups in page)
                    written += len(page)
                    if progress:
                        progress(written, total)
        else:
            with pq.ParquetWriter(str(partial), _PARQUET_SCHEMA) as writer:
                for page in _pages(database, tenant, policy, page_size):
                    writer.write_table(_parquet_table(
                        [openai_jsonl.from_trace(trace, groups, False) for trace, groups in page]))
                    written += len(page)
                    if progress:
                        progress(written, total)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return written


def _count(database: Database, tenant: str, policy: str | None) -> int:
    with database.session() as session:
        q = select(func.count()).select_from(Trace).where(Trace.tenant == tenant)
        if policy is not None:
            q = q.join(Policy, Policy.id == Trace.policy_id).where(Policy.name == policy)
        return int(session.scalar(q) or 0)


def _pages(
    database: Database, tenant: str, policy: str | None, size: int
) -> Iterator[list[tuple[TraceOut, list[dict[str, Any]]]]]:
    cursor: str | None = None
    while True:
        with database.session() as session:
            page = traces.list_traces(session, tenant, policy=policy, split=None,
                                      has_outcome=None, since=None, until=None, cursor=cursor,
                                      limit=size)
            groups = graded_groups(session, [t.id for t in page.items])
        yield [(t, groups.get(t.id, [])) for t in page.items]
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def graded_groups(session: Session, trace_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Each trace's graded rollout groups: the reference snapshot, the grader, every rollout's
    text and reward."""
    out: dict[int, list[dict[str, Any]]] = {}
    if not trace_ids:
        return out
    rows = session.execute(
        select(RolloutGroup, Snapshot.served_name)
        .join(Snapshot, Snapshot.id == RolloutGroup.snapshot_id)
        .where(RolloutGroup.trace_id.in_(trace_ids), RolloutGroup.status == GroupStatus.graded)
        .order_by(RolloutGroup.id)
    ).all()
    for group, served_name in rows:
        out.setdefault(group.trace_id, []).append({
            "reference_snapshot": served_name,
            "grader_version": group.grader_version,
            "sampling_params": group.sampling_params,
            "reward_mean": group.reward_mean,
            "reward_std": group.reward_std,
            "rollouts": [{"index": r.index, "text": r.text, "reward": r.reward,
                          "parse_ok": r.parse_ok, "finish_reason": r.finish_reason,
                          "behaviour_logprob_sum": r.behaviour_logprob_sum}
                         for r in group.rollouts],
        })
    return out


_PARQUET_SCHEMA = pa.schema([
    ("external_id", pa.string()), ("policy", pa.string()), ("split", pa.string()),
    ("trainable", pa.bool_()), ("untrainable_reason", pa.string()), ("model", pa.string()),
    ("finish_reason", pa.string()), ("messages", pa.string()), ("tools", pa.string()),
    ("outcomes", pa.string()), ("groups", pa.string()), ("rewards", pa.list_(pa.float64())),
    ("metadata", pa.string()), ("occurred_at", pa.string()),
])


def _parquet_table(lines: list[dict[str, Any]]) -> pa.Table:
    """One row per trace: the conversation (answer last) and nested values as JSON text, the
    rewards of its graded rollouts as a list column."""
    rows = []
    for line in lines:
        ours = line.get(openai_jsonl.KEY, {})
        rows.append({
            "external_id": ours.get("external_id"), "policy": ours.get("policy"),
            "split": ours.get("split"), "trainable": ours.get("trainable"),
            "untrainable_reason": ours.get("untrainable_reason"), "model": ours.get("model"),
            "finish_reason": ours.get("finish_reason"),
            "messages": json.dumps(line["messages"], ensure_ascii=False),
            "tools": json.dumps(line["tools"]) if "tools" in line else None,
            "outcomes": json.dumps(ours.get("outcomes", []), ensure_ascii=False),
            "groups": json.dumps(ours.get("groups", []), ensure_ascii=False),
            "rewards": [r["reward"] for g in ours.get("groups", []) for r in g["rollouts"]
                        if r["reward"] is not None],
            "metadata": json.dumps(ours.get("metadata", {}), ensure_ascii=False),
            "occurred_at": ours.get("occurred_at"),
        })
    return pa.Table.from_pylist(rows, schema=_PARQUET_SCHEMA)
