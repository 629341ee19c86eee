"""Process caches of rows that rarely change (API keys, policies), exact on every request.

Each cache belongs to a counter in ``cache_generations`` that database triggers bump in the
transaction that changes its rows (migration 0008). A request reads every counter in one
statement, its first (``generations``); a cache whose counter moved is emptied before use. So a
revoked key is refused on the very next request in every process, and a request that finds what
it needs cached makes no lookup round trip at all.

Entries are loaded in the same transaction after the counters were read, so they are at least
as new as the generation they are filed under; a change committed in between only empties the
cache once more on the next request.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar, cast

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.db import first_statement
from app.models import CacheGeneration

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_SESSION_KEY = "cache.generations"
_PER_REQUEST = "cache.per_request"
_ABSENT = object()
_COUNTERS = select(CacheGeneration.name, CacheGeneration.generation)


class NotCached(LookupError):
    """A lookup under ``cached_only`` that the process caches could not answer."""


_cached_only: contextvars.ContextVar[bool] = contextvars.ContextVar("cached_only", default=False)
_seen_lock = threading.Lock()
_seen: dict[str, dict[str, int]] = {}


_keys: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def database_key(engine: Engine) -> str:
    """How the caches tell databases apart (tests and tools point one process at several): the
    engine's URL, rendered once per engine (rendering took ~7 µs, and a cached single trace
    asks four times)."""
    key = _keys.get(engine)
    if key is None:
        key = _keys[engine] = str(engine.url)
    return key


def _database_of(session: Session) -> str:
    return database_key(session.get_bind().engine)


def _saw(database: str, counters: dict[str, int]) -> None:
    """Remember the newest counters this process has read from ``database``: the counters only
    grow (triggers bump them), so the newest of each is the largest read."""
    with _seen_lock:
        held = _seen.setdefault(database, {})
        for name, generation in counters.items():
            if generation > held.get(name, generation - 1):
                held[name] = generation


def last_seen(database: str) -> dict[str, int] | None:
    """The newest counters this process has read from ``database`` (by URL), or None before
    its first read."""
    with _seen_lock:
        held = _seen.get(database)
        return dict(held) if held else None


@contextmanager
def cached_only(session: Session, counters: dict[str, int]) -> Iterator[None]:
    """Answer every cache lookup made with ``session`` from the process caches, as of
    ``counters`` (``last_seen``), without a statement: a lookup the caches cannot answer raises
    ``NotCached`` instead of loading. What is read this way may be stale by the time it is
    used; the group writer reads the counters again in the transaction that writes
    (``app.traces.group_commit``) and writes only what was read under the same counters."""
    per_request(session)
    session.info[_SESSION_KEY] = (None, dict(counters))
    token = _cached_only.set(True)
    try:
        yield
    finally:
        _cached_only.reset(token)


def per_request(session: Session) -> None:
    """Mark ``session`` as one HTTP request's: its counters are read once for the whole request,
    across its transactions (auth ends its read-only one early to hand the connection back).
    As exact as per transaction: the request simply sees the caches as of its start, and a
    change committed meanwhile empties them on the next request. Long-lived sessions (workers,
    CLI) stay per transaction."""
    session.info[_PER_REQUEST] = True


def generations(session: Session) -> dict[str, int]:
    """Every counter, read once per transaction, or once per request for a session marked by
    ``per_request`` (by its first statement when the request's dependencies ask first, as
    ``current_principal`` does)."""
    held = session.info.get(_SESSION_KEY)
    if held is not None and (held[0] is session.get_transaction()
                             or session.info.get(_PER_REQUEST)):
        return dict(held[1])
    rows = first_statement(session, lambda: session.execute(_COUNTERS).tuples().all())
    return accept_generations(session, rows)


COUNTERS_SQL = "SELECT name, generation FROM cache_generations"
"""Every counter, as SQL for a caller that reads them with other statements in one round trip
(psycopg's pipeline mode) and files them with ``accept_generations``."""


COUNTERS_OBJECT_SQL = ("SELECT COALESCE(jsonb_object_agg(name, generation), '{}'::jsonb)"
                       " FROM cache_generations")
"""Every counter as one JSON object, for a statement that checks them in its own snapshot
(the group writer's insert, ``app.traces.service.store_new``)."""


def accept_generations(session: Session, rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    """The counters a caller read itself (``COUNTERS_SQL``) as the first statement of
    ``session``'s transaction, filed as ``generations`` files its own read: that transaction's
    lookups then use them, and the process has seen them (``last_seen``)."""
    counters = dict(rows)
    session.info[_SESSION_KEY] = (session.get_transaction(), counters)
    _saw(_database_of(session), counters)
    return dict(counters)


def read_request_generations(session: Session) -> None:
    """A request's counters, read before anything else as one autocommit statement on Postgres:
    no BEGIN and no COMMIT, one round trip instead of three, and no transaction left open (the
    connection goes back to the pool at once). Read-only, the statement sees what a
    transaction's first statement would; entries loaded later (on a cache miss) run in their
    own transaction, after it, so they are still at least as new as the counters. Only for a
    session marked ``per_request`` that has not begun; otherwise ``generations`` reads them as
    before."""
    if (not session.info.get(_PER_REQUEST) or _SESSION_KEY in session.info
            or session.in_transaction() or session.get_bind().dialect.name != "postgresql"):
        return

    def read() -> dict[str, int]:
        rows = first_statement(session, lambda: session.connection(
            execution_options={"isolation_level": "AUTOCOMMIT"},
        ).execute(_COUNTERS).tuples().all())
        return dict(rows)

    database = _database_of(session)
    counters = _request_reads(database).get(read)
    _saw(database, counters)
    session.info[_SESSION_KEY] = (None, counters)
    session.commit()  # hands the connection back (if it took one); the pool resets its isolation


R = TypeVar("R")


class SharedRead(Generic[R]):
    """One read for all the callers that wait for it, each given a read that *started after it
    called* — as new as a read of its own. While a read is in flight, everyone who calls
    meanwhile waits for it to end and then shares the next one, which the first of them runs.

    The request counters: under 50 concurrent requests, each request's own counter read was
    ~40% of the API process's busy time; shared, a burst of requests makes one or two reads
    and the others no round trip at all, while a key revoked before a request arrived is still
    refused by that request. A read that fails is not shared: each waiter then reads for
    itself (and fails as it would have alone: 503 when the database is gone)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._started = 0  # reads begun so far; the n-th read is number n
        self._in_flight = False
        self._finished = 0  # number of the last read that ended
        self._value: tuple[R] | None = None  # its value, None when it failed

    def get(self, read: Callable[[], R]) -> R:
        with self._cond:
            need = self._started + 1  # the first read to begin after this call
            while self._finished < need and self._in_flight:
                self._cond.wait()
            shared = self._finished >= need
            if shared and self._value is not None:
                return self._value[0]
            if not shared:
                self._in_flight = True
                self._started += 1
                number = self._started
        if shared:  # the read shared with this caller failed: its own, outside the lock
            return read()
        value: tuple[R] | None = None
        try:
            value = (read(),)
            return value[0]
        finally:
            with self._cond:
                self._in_flight = False
                self._finished = number
                self._value = value
                self._cond.notify_all()


_reads_lock = threading.Lock()
_reads: dict[str, SharedRead[dict[str, int]]] = {}


def _request_reads(database: str) -> SharedRead[dict[str, int]]:
    """The shared counter read of one database (tests point one process at several)."""
    with _reads_lock:
        return _reads.setdefault(database, SharedRead())


class GenerationCache(Generic[K, V]):
    """Values by key for one counter, per database (tests and tools point one process at
    several); "not found" is cached too, and the whole cache is dropped past ``max_entries`` so
    a stream of unknown keys cannot grow it without bound."""

    def __init__(self, counter: str, max_entries: int = 10_000) -> None:
        self.counter = counter
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._by_database: dict[str, tuple[int, dict[K, object]]] = {}

    def get_many(
        self, session: Session, keys: Iterable[K], load: Callable[[set[K]], dict[K, V]]
    ) -> dict[K, V]:
        """The values of ``keys`` that exist; ``load`` fetches the missing ones (returning only
        those found) in ``session``'s transaction."""
        wanted = set(keys)
        generation = generations(session).get(self.counter)
        cached_only = _cached_only.get()
        if generation is None:  # a database without the counter: no caching, never stale
            if cached_only:
                raise NotCached(self.counter)
            return load(wanted)
        database = _database_of(session)
        with self._lock:
            held_generation, entries = self._by_database.get(database, (generation, {}))
            if held_generation != generation or len(entries) > self.max_entries:
                entries = {}
            self._by_database[database] = (generation, entries)
            found: dict[K, object] = {k: entries[k] for k in wanted if k in entries}
        missing = wanted - found.keys()
        if missing and cached_only:
            raise NotCached(self.counter)
        if missing:
            loaded = load(missing)
            fresh = {k: loaded.get(k, _ABSENT) for k in missing}
            with self._lock:
                # Filed only under the generation they were loaded at: a newer one already
                # seen by another request wins.
                current = self._by_database.get(database)
                if current is not None and current[0] == generation:
                    current[1].update(fresh)
            found.update(fresh)
        return {k: cast(V, v) for k, v in found.items() if v is not _ABSENT}

    def clear(self) -> None:
        with self._lock:
            self._by_database.clear()
