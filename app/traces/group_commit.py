"""Group commit: concurrent single-trace POSTs are written by one writer, many to a statement
and a commit, instead of one commit (one WAL flush) per request.

The life of a single trace on Postgres::

    request (event loop; the DB parts in the threadpool)    writer (a task on the same loop)
    ----------------------------------------------------    --------------------------------
    auth + admit: the counters statement, cache reads,
    validation, redaction, the row; read transaction
    ended (its connection back to the pool) — or, warm,
    all of it from the process caches (admit_cached)
    queue the row, await its future  ---------------------> take the rows waiting, and those
                                                            that arrive within
                                                            ``group_commit_window_ms`` while
                                                            more are on their way (at most
                                                            ``group_commit_max_items``)
                                                            service.store_new on the writer's
                                                            own async connection, autocommit:
                                                            one statement reads the counters,
                                                            INSERTs the rows (ON CONFLICT …
                                                            RETURNING) and commits, in one
                                                            round trip
    answered with its own result     <--------------------- every future settled after that
                                                            commit, never before

The writer runs between the requests its loop serves, so a round trip's wait is the loop's
own: a writer thread (as before) held the GIL for a quarter of the process's time and waited
for it after every round trip. A row ``store_new`` cannot write alone (an inline outcome, an
outcome that arrived before its trace) is left out of its statement and written after it the
ordinary way, on a session in a thread (``_commit_plainly``: ``service.store_under`` or
``service.store``), the writer waiting for it; so is the whole group when the statement wrote
nothing (a value the database refuses, counters that moved).

No trace is acknowledged before the commit that holds it, so a crash loses only unanswered
requests. A connection lost, or the database gone, fails the whole group with the error the
direct path raises (503 + Retry-After); the writer's connection found dead (a database
restart) is replaced and the group tried once more — a row whose commit had in fact gone
through then answers as a duplicate of itself, as a client's own retry would. Any other
database error (a value the database refuses: 422) is the fault of one trace, so the group is
written again one trace to a transaction and only that trace's request fails. SQLite keeps the
direct path: it has one writer anyway.

A row admitted from the process caches alone, without a statement (``admitted_under``: the
counters those caches were read under, ``app.cache.cached_only``), is written only if the
counters the writer's statement reads, in the snapshot it inserts under, are still those: a
key revoked or a policy changed since is caught there, and that request is answered ``None``
— it must be admitted again the ordinary way. When they have moved, the statement inserts
nothing and the rows admitted the ordinary way are written again on their own.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import anyio
import psycopg
from sqlalchemy.exc import DBAPIError, OperationalError, StatementError
from sqlalchemy.orm import Session

from app.auth.service import Principal, Scope, authenticate, hash_key
from app.cache import NotCached, cached_only, database_key, last_seen
from app.db import Database, first_statement, get_database, utcnow
from app.observability import INGEST_GROUP_SIZE
from app.settings import Settings, get_settings
from app.traces import service
from app.traces.schemas import ItemResult


@dataclass
class _Waiting:
    """A row in the queue and the request waiting for it."""

    database: Database
    entry: service.Admitted
    future: asyncio.Future[ItemResult | None]
    admitted_under: dict[str, int] | None

    def settle(self, result: ItemResult | BaseException | None) -> None:
        if self.future.done():  # the client went away and its request was cancelled
            return
        if isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


WRITER_APPLICATION_NAME = "tracelearn group writer"
"""How the writer's connections are named to Postgres (``pg_stat_activity.application_name``)."""

# A writer's connection is kept this long after its last group, so steady traffic never
# waits for a connection (a Postgres backend forked) and an idle process holds none.
_IDLE_S = 5.0


@dataclass
class _Groups:
    """One event loop's share of the writer: its queue, the task that drains it, and that
    task's connection to each database (futures and connections belong to one loop)."""

    queue: collections.deque[_Waiting] = field(default_factory=collections.deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # Requests preparing a row for the queue: a group is held open (up to the window) only
    # while one is on its way, so a lone request never waits.
    arriving: int = 0
    drain: asyncio.Task[None] | None = None
    connections: dict[int, psycopg.AsyncConnection[Any]] = field(default_factory=dict)


class GroupWriter:
    """The process's writer of single traces: on each event loop, one task that takes the rows
    queued and writes them a group at a time on its own connection, between the requests the
    loop serves (so no thread waits for the GIL after each round trip)."""

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Groups] = (
            weakref.WeakKeyDictionary())

    def _here(self, loop: asyncio.AbstractEventLoop | None = None) -> _Groups:
        loop = loop or asyncio.get_running_loop()
        groups = self._loops.get(loop)
        if groups is None:
            groups = self._loops[loop] = _Groups()
        return groups

    def announce(self) -> None:
        """A request is preparing a row for the queue; ``write`` or ``withdraw`` follows."""
        self._here().arriving += 1

    def withdraw(self) -> None:
        """The announced row will not come (refused, or its request failed)."""
        self._here().arriving -= 1

    async def write(self, database: Database, entry: service.Admitted,
                    admitted_under: dict[str, int] | None = None) -> ItemResult | None:
        """``entry``'s result (announced first), once the commit holding its row is done; None
        when it was ``admitted_under`` counters that have moved since (nothing written)."""
        loop = asyncio.get_running_loop()
        groups = self._here(loop)
        future: asyncio.Future[ItemResult | None] = loop.create_future()
        groups.arriving -= 1
        groups.queue.append(_Waiting(database, entry, future, admitted_under))
        groups.arrived.set()
        if groups.drain is None:
            groups.drain = loop.create_task(self._drain(groups))
        return await future

    @property
    def waiting(self) -> int:
        """Rows queued for the next group, on every loop."""
        return sum(len(groups.queue) for groups in list(self._loops.values()))

    async def _drain(self, groups: _Groups) -> None:
        """Write groups while rows come; after ``_IDLE_S`` without one, close the connections
        and end (the next row starts another task)."""
        try:
            while True:
                if not groups.queue:
                    groups.arrived.clear()
                    try:
                        await asyncio.wait_for(groups.arrived.wait(), _IDLE_S)
                    except TimeoutError:
                        return
                    continue
                group = await self._gather(groups)
                try:
                    for database_group in _by_database(group):
                        await self._commit(groups, database_group)
                except Exception as exc:  # the writer must outlive any one group
                    _fail(group, exc)
        finally:
            # Before any await: a row queued from here on starts a new task.
            groups.drain = None
            connections, groups.connections = groups.connections, {}
            for connection in connections.values():
                with suppress(psycopg.Error):
                    await connection.close()

    @staticmethod
    async def _gather(groups: _Groups) -> list[_Waiting]:
        """The first row waiting and those that join it within the window while more are on
        their way, up to the group's size."""
        settings = get_settings()
        group = [groups.queue.popleft()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.group_commit_window_ms / 1000
        while len(group) < settings.group_commit_max_items:
            if groups.queue:
                group.append(groups.queue.popleft())
                continue
            remaining = deadline - loop.time()
            if groups.arriving <= 0 or remaining <= 0:
                break
            groups.arrived.clear()
            try:
                await asyncio.wait_for(groups.arrived.wait(), remaining)
            except TimeoutError:
                break
        return group

    async def _commit(self, groups: _Groups, group: list[_Waiting]) -> None:
        try:
            results = await self._store_new(groups, group)
        except StatementError as exc:
            # The database is gone or the connection died: every request fails as it would
            # alone (503 + Retry-After).
            _fail(group, exc)
            return
        outcomes: list[ItemResult | BaseException | None] = list(results)
        if left := [i for i, result in enumerate(results) if result is None]:
            # An inline outcome, an outcome that came first, a refused value or counters that
            # moved: the ordinary statements, on a session, in a thread.
            plain = await anyio.to_thread.run_sync(_commit_plainly, [group[i] for i in left])
            for i, outcome in zip(left, plain, strict=True):
                outcomes[i] = outcome
        if written := sum(isinstance(outcome, ItemResult) for outcome in outcomes):
            INGEST_GROUP_SIZE.observe(written)
        for waiting, outcome in zip(group, outcomes, strict=True):
            waiting.settle(outcome)

    async def _store_new(self, groups: _Groups,
                         group: list[_Waiting]) -> list[ItemResult | None]:
        """Each row's result, committed on the loop's own connection by ``store_new`` under
        the counters its cached rows were admitted under; None for each row it left for the
        ordinary path (every row, when nothing could be written this way)."""
        left: list[ItemResult | None] = [None] * len(group)
        under = [w.admitted_under for w in group if w.admitted_under is not None]
        if any(counters != under[0] for counters in under):
            return left  # admitted under several counters: only the newest can be current
        database, entries = group[0].database, [w.entry for w in group]
        expected = under[0] if under else None
        attempts = 2
        while True:
            connection = await self._connection(groups, database)
            try:
                return await service.store_new(connection, entries, expected)
            except psycopg.OperationalError as exc:
                # A connection found dead (a database restart) is replaced and the group tried
                # once more, as ``first_statement`` does. Had the insert committed before the
                # connection died, its rows are judged duplicates of themselves.
                await self._drop(groups, database)
                attempts -= 1
                if not attempts:
                    raise _translated(exc, database) from exc
            except psycopg.Error:
                # A value the database refuses (nothing written: one statement): the ordinary
                # path finds whose it is.
                return left

    @staticmethod
    async def _connection(groups: _Groups, database: Database) -> psycopg.AsyncConnection[Any]:
        connection = groups.connections.get(id(database))
        if connection is None or connection.closed:
            url = database.engine.url.set(drivername="postgresql")
            try:
                connection = await psycopg.AsyncConnection.connect(
                    url.render_as_string(hide_password=False), autocommit=True,
                    application_name=WRITER_APPLICATION_NAME)
            except psycopg.OperationalError as exc:
                raise _translated(exc, database) from exc
            groups.connections[id(database)] = connection
        return connection

    @staticmethod
    async def _drop(groups: _Groups, database: Database) -> None:
        connection = groups.connections.pop(id(database), None)
        if connection is not None:
            with suppress(psycopg.Error):
                await connection.close()


def _translated(exc: psycopg.Error, database: Database) -> StatementError:
    """The writer's connection's error, as SQLAlchemy raises it (the connection is dropped)."""
    return service.driver_error(exc, database.engine.dialect, invalidated=True,
                                statement=service.GROUP_INSERT)


def _fail(group: list[_Waiting], exc: BaseException) -> None:
    for waiting in group:
        waiting.settle(exc)


def _commit_plainly(group: list[_Waiting]) -> list[ItemResult | BaseException | None]:
    """What becomes of each row of ``group`` written with the ordinary statements: its result,
    None when its counters had moved, or the error its request fails with."""
    try:
        return list(_store(group))
    except OperationalError as exc:
        # The database is gone or the connection died: every request fails as it would
        # alone (503 + Retry-After), nothing is acknowledged.
        return [exc] * len(group)
    except DBAPIError as exc:
        if len(group) == 1 or exc.connection_invalidated:
            return [exc] * len(group)
        # Any other database error is one trace's (a value the database refuses): it must
        # not fail the others in its group, so each is written again on its own.
        return [outcome for waiting in group for outcome in _commit_plainly([waiting])]
    except Exception as exc:
        return [exc] * len(group)


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
    where = database_key(database.engine)
    counters = last_seen(where)
    if counters is None:
        return None
    context = warm_contexts.get(database, where, raw_key, raw, settings, counters)
    if context is None:
        return None
    principal, admission = context
    refused, admitted = service.admit_prepared([raw], replace(admission, now=utcnow()))
    if refused:
        return None
    return principal, admitted[0], counters


@dataclass(frozen=True)
class _Contexts:
    """Contexts read as of one database, settings object and set of counters."""

    database: str
    settings: Settings
    counters: dict[str, int]
    by_request: dict[tuple[str, str | None, str | None], tuple[Principal, service.Admission]]


class WarmContexts:
    """What admitting a warm single trace reads besides the trace — the caller's principal and
    ``service.prepare``'s answer for the policy and served model it names — kept per key,
    policy and model as of the counters they were read under. All of it comes from the process
    caches under those counters (``cached_only``) and changes only when they move, so it is
    read once per counters instead of once per request (a session, three cache lookups and the
    key's check cost about as much as admitting the trace itself). Dropped whole when the
    counters, the database or the settings object change; only principals that may ingest are
    kept, under the hash of their key (never the key itself), at most ``MAX_ENTRIES``."""

    MAX_ENTRIES = 1024

    def __init__(self) -> None:
        self._held: _Contexts | None = None  # replaced whole, never changed in place but to add

    def get(self, database: Database, where: str, raw_key: str, raw: dict[str, Any],
            settings: Settings, counters: dict[str, int],
            ) -> tuple[Principal, service.Admission] | None:
        """The principal and the admission context for ``raw`` on ``database`` (``where``:
        its ``database_key``); None when the key is unknown, revoked or lacks the ``ingest``
        scope, or something needed is not cached."""
        policy, model = raw.get("policy"), raw.get("model")
        if not (isinstance(policy, str | None) and isinstance(model, str | None)):
            # Not a name: the trace is refused, and there is nothing to keep.
            return _read_context(database, raw_key, raw, settings, counters)
        key = (hash_key(raw_key), policy, model)
        held = self._held  # read once: another loop's thread may replace it meanwhile
        if (held is not None and held.settings is settings and held.database == where
                and held.counters == counters):
            if (found := held.by_request.get(key)) is not None:
                return found
        else:
            held = None
        context = _read_context(database, raw_key, raw, settings, counters)
        if context is None:
            return None
        if held is None or len(held.by_request) >= self.MAX_ENTRIES:
            held = self._held = _Contexts(where, settings, dict(counters), {})
        held.by_request[key] = context
        return context

    def clear(self) -> None:
        self._held = None


warm_contexts = WarmContexts()


def _read_context(database: Database, raw_key: str, raw: dict[str, Any], settings: Settings,
                  counters: dict[str, int]) -> tuple[Principal, service.Admission] | None:
    session = database.sessionmaker()
    try:
        with cached_only(session, counters):
            principal = authenticate(session, raw_key)
            if principal is None or not principal.holds(Scope.ingest):
                return None
            return principal, service.prepare(session, principal, [raw], settings,
                                              untrainable=None, generated_response=False)
    except NotCached:
        return None
    finally:
        session.close()


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
