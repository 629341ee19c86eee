"""Group commit: concurrent single-trace POSTs are written by one writer, many to a statement
and a commit, instead of one commit (one WAL flush) per request.

The life of a single trace on Postgres::

    request (event loop; the DB parts in the threadpool)    writer (one thread per process)
    ----------------------------------------------------    -------------------------------
    auth + admit: the counters statement, cache reads,
    validation, redaction, the row; read transaction
    ended (its connection back to the pool)
    queue the row, await its future  ---------------------> take the first row waiting, then
                                                            every row that arrives within
                                                            ``group_commit_window_ms`` while
                                                            more are on their way (at most
                                                            ``group_commit_max_items``)
                                                            store(): one multi-row INSERT …
                                                            ON CONFLICT … RETURNING; COMMIT
                                                            (store_under for rows admitted
                                                            from the caches: the counters and
                                                            the INSERT in one round trip)
    answered with its own result     <--------------------- every future settled after that
                                                            commit, never before

No trace is acknowledged before the commit that holds it, so a crash loses only unanswered
requests. A connection lost, or the database gone, fails the whole group with the error the
direct path raises (503 + Retry-After). Any other database error (a value the database refuses:
422) is the fault of one trace, so the group is written again one trace to a transaction and
only that trace's request fails. SQLite keeps the direct path: it has one writer anyway.

A row admitted from the process caches alone, without a statement (``admitted_under``: the
counters those caches were read under, ``app.cache.cached_only``), is written only if the
counters the writer reads in the same transaction, its first statement, are still those: a
key revoked or a policy changed since is caught there, and that request is answered
``None`` — it must be admitted again the ordinary way. The counters are read in one round trip
with the INSERT (``service.store_under``); when they have moved, the transaction is rolled back
and the rows admitted the ordinary way are written again on their own.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from app.auth.service import Principal, Scope, authenticate
from app.cache import NotCached, cached_only, database_key, last_seen
from app.db import Database, first_statement, get_database
from app.observability import INGEST_GROUP_SIZE
from app.settings import Settings, get_settings
from app.traces import service
from app.traces.schemas import ItemResult


@dataclass
class _Waiting:
    """A row in the queue and the request waiting for it."""

    database: Database
    entry: service.Admitted
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[ItemResult | None]
    admitted_under: dict[str, int] | None

    def settle(self, result: ItemResult | BaseException | None) -> None:
        # RuntimeError: its event loop is closed, so nobody is waiting any more.
        with suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, result)


def _settle(future: asyncio.Future[ItemResult | None],
            result: ItemResult | BaseException | None) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class GroupWriter:
    """The process's one writer of single traces: a daemon thread fed by a queue."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Waiting] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Requests validating a trace that will join a group: the writer holds a group open
        # (up to the window) only while one is on its way, so a lone request never waits.
        self._arriving = 0
        self._arrivals = threading.Lock()

    def announce(self) -> None:
        """A request is preparing a row for the queue; ``write`` or ``withdraw`` follows."""
        self._ensure_running()
        with self._arrivals:
            self._arriving += 1

    def withdraw(self) -> None:
        """The announced row will not come (refused, or its request failed)."""
        with self._arrivals:
            self._arriving -= 1

    async def write(self, database: Database, entry: service.Admitted,
                    admitted_under: dict[str, int] | None = None) -> ItemResult | None:
        """``entry``'s result (announced first), once the commit holding its row is done; None
        when it was ``admitted_under`` counters that have moved since (nothing written)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ItemResult | None] = loop.create_future()
        with self._arrivals:  # arrives and is queued at once: the writer never sees neither
            self._arriving -= 1
            self._queue.put(_Waiting(database, entry, loop, future, admitted_under))
        return await future

    @property
    def waiting(self) -> int:
        """Rows queued for the next group."""
        return self._queue.qsize()

    def _more_coming(self) -> bool:
        with self._arrivals:
            return self._arriving > 0 or not self._queue.empty()

    def _ensure_running(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="trace-group-commit",
                                          daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        while True:
            group = self._gather()
            try:
                for database_group in _by_database(group):
                    self._commit(database_group)
            except BaseException as exc:  # the writer must outlive any one group
                self._fail(group, exc)

    @staticmethod
    def _fail(group: list[_Waiting], exc: BaseException) -> None:
        for waiting in group:
            waiting.settle(exc)

    def _gather(self) -> list[_Waiting]:
        """The first row waiting (blocking until there is one) and those that join it within the
        window while more are on their way, up to the group's size."""
        group = [self._queue.get()]
        settings = get_settings()
        deadline = time.monotonic() + settings.group_commit_window_ms / 1000
        while len(group) < settings.group_commit_max_items:
            try:
                group.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            if not self._more_coming():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                group.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return group

    def _commit(self, group: list[_Waiting]) -> None:
        try:
            results = _store(group)
        except OperationalError as exc:
            # The database is gone or the connection died: every request fails as it would
            # alone (503 + Retry-After), nothing is acknowledged.
            self._fail(group, exc)
            return
        except DBAPIError as exc:
            if len(group) == 1 or exc.connection_invalidated:
                self._fail(group, exc)
                return
            # Any other database error is one trace's (a value the database refuses): it must
            # not fail the others in its group, so each is written again on its own.
            for waiting in group:
                self._commit([waiting])
            return
        except Exception as exc:
            self._fail(group, exc)
            return
        if written := sum(result is not None for result in results):
            INGEST_GROUP_SIZE.observe(written)
        for waiting, result in zip(group, results, strict=True):
            waiting.settle(result)


def _by_database(group: list[_Waiting]) -> list[list[_Waiting]]:
    """Tests and tools point one process at several databases in turn; a group never mixes
    them."""
    by: dict[int, list[_Waiting]] = {}
    for waiting in group:
        by.setdefault(id(waiting.database), []).append(waiting)
    return list(by.values())


def _store(group: Sequence[_Waiting]) -> list[ItemResult | None]:
    """Each row's result in order, None for a row admitted under counters that have moved."""
    admitted_under = [w.admitted_under for w in group if w.admitted_under is not None]
    if not admitted_under:
        return _store_plainly(group)
    # The counters only grow, and a process files every read it makes (``last_seen``): the
    # rows of a group were admitted under one chain of counters, and only the newest can
    # still be current. Rows admitted under an older one are held back at once.
    newest = max(admitted_under, key=lambda counters: sum(counters.values()))
    written = [w for w in group if w.admitted_under in (None, newest)]
    with group[0].database.session() as session:
        # Nothing is committed before ``store_under`` returns, so a connection found dead on
        # the way (a database restart) is replaced and the whole of it run once more.
        results: Sequence[ItemResult | None] | None = first_statement(
            session, lambda: service.store_under(session, [w.entry for w in written], newest))
        if results is None:
            session.rollback()
    if results is None:
        # The counters moved: no row admitted from the caches is written; those the route
        # admitted (under no counters) are, on their own.
        written = [w for w in group if w.admitted_under is None]
        results = _store_plainly(written) if written else []
    by_row = {id(w): result for w, result in zip(written, results, strict=True)}
    return [by_row.get(id(w)) for w in group]


def _store_plainly(group: Sequence[_Waiting]) -> list[ItemResult | None]:
    """Rows admitted under no counters, each result in order."""
    with group[0].database.session() as session:
        # The transaction's first statement runs once more on a fresh connection when the
        # pooled one died (a database restart). A failed COMMIT is not retried.
        return list(first_statement(
            session, lambda: service.store(session, [w.entry for w in group])))


writer = GroupWriter()


def grouped(settings: Settings, database: Database) -> bool:
    """Whether single traces go through the group writer here."""
    return settings.group_commit and database.engine.dialect.name == "postgresql"


async def ingest_one(
    session: Session, principal: Principal, raw: object, settings: Settings
) -> ItemResult:
    """One trace, as ``service.ingest`` would store it, committed in a group on Postgres."""
    database = get_database()
    if not grouped(settings, database):
        batch = await anyio.to_thread.run_sync(
            partial(service.ingest, session, principal, [raw], settings))
        return batch.results[0]
    writer.announce()
    try:
        refused, admitted = await anyio.to_thread.run_sync(
            partial(_admit, session, principal, raw, settings))
    except BaseException:
        writer.withdraw()
        raise
    if refused is not None:
        writer.withdraw()
        service.count_results([refused])
        return refused
    assert admitted is not None
    result = await writer.write(database, admitted)
    assert result is not None  # admitted under no counters: never held back
    service.count_results([result])
    return result


def _admit(
    session: Session, principal: Principal, raw: object, settings: Settings
) -> tuple[ItemResult | None, service.Admitted | None]:
    refused, admitted = service.admit(session, principal, [raw], settings)
    # The request's transaction only read (counters, cache misses): end it now, so its
    # connection goes back to the pool instead of idling while the row waits for its group.
    session.commit()
    return (refused[0], None) if refused else (None, admitted[0])


def admit_cached(
    database: Database, raw_key: str, raw: dict[str, Any], settings: Settings
) -> tuple[Principal, service.Admitted, dict[str, int]] | None:
    """The caller's principal, the trace admitted and the counters they were read under, all
    from the process caches without a statement (``app.cache.cached_only``); None when
    anything needed is not cached, the key is unknown, revoked or lacks the ``ingest`` scope,
    or the trace is refused: the ordinary path then answers, and says why."""
    counters = last_seen(database_key(database.engine))
    if counters is None:
        return None
    session = database.sessionmaker()
    try:
        with cached_only(session, counters):
            principal = authenticate(session, raw_key)
            if principal is None or not principal.holds(Scope.ingest):
                return None
            refused, admitted = service.admit(session, principal, [raw], settings)
    except NotCached:
        return None
    finally:
        session.close()
    if refused:
        return None
    return principal, admitted[0], counters


async def write_cached(
    database: Database, entry: service.Admitted, counters: dict[str, int]
) -> ItemResult | None:
    """``admit_cached``'s trace written in a group; None when the counters have moved since
    (nothing written: admit it again the ordinary way)."""
    writer.announce()
    result = await writer.write(database, entry, counters)
    if result is not None:
        service.count_results([result])
    return result
