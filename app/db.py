"""Engine, session factory and the declarative base: the one way code talks to the database."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    CursorResult,
    DateTime,
    Engine,
    Executable,
    Integer,
    MetaData,
    Table,
    TypeDecorator,
    create_engine,
    event,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from app.settings import Settings, get_settings

# Portable JSON: JSONB on Postgres (indexable, compact), plain JSON text on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY, so big ids fall back to Integer there.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python. SQLite stores no zone and hands
    back naive values; they are UTC by construction here, so they come back as UTC, and every
    API answer carries RFC 3339 with ``Z`` whichever database wrote it."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType}


def utcnow() -> datetime:
    return datetime.now(UTC)


def storable_text(text: str) -> str:
    """Postgres text cannot hold NUL, and a model can generate one; such text keeps its place
    with U+FFFD (what a lossy decode would show anyway). Input from clients is refused with 422
    instead (``app.traces.strings``): only generated text is mended."""
    return text.replace("\x00", "\ufffd")


# An escaped NUL in serialized JSON: ``\u0000`` whose backslash follows an even number of
# backslashes (after an odd number, it is an escaped backslash and then the text "u0000").
_ESCAPED_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def json_dumps(value: Any) -> str:
    """JSON columns' serializer: orjson (several times faster than ``json.dumps`` on the ingest
    path's messages and metadata), falling back to ``json.dumps`` for what orjson refuses
    (integers beyond 64 bits), so anything storable before stays storable. Timestamps are
    RFC 3339 with their offset, a naive one read as UTC (as ``UtcDateTime`` binds it).
    Postgres JSONB refuses ``\\u0000``, so a NUL anywhere in the value (generated text in an
    evaluation's examples, an error message) is stored as U+FFFD, on SQLite too, rather than
    failing the whole write."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_NAIVE_UTC).decode()
    except TypeError:
        text = json.dumps(value, default=_utc_isoformat)
    if "\\u0000" in text:
        text = _ESCAPED_NUL.sub(r"\1\\ufffd", text)
    return text


def _utc_isoformat(value: Any) -> str:
    if not isinstance(value, datetime):
        raise TypeError(f"{type(value).__name__} is not JSON serializable")
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()


def make_engine(url: str, **kwargs: Any) -> Engine:
    kwargs.setdefault("json_serializer", json_dumps)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while a worker writes; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    # No pre-ping: it costs a round trip on every checkout, i.e. on every request. Connections
    # are recycled before anything between us and the server would drop them idle, and one
    # that died anyway (a database restart) fails its first statement, which the pool turns
    # into "invalidate every older connection" and ``first_statement`` retries once.
    kwargs.setdefault("pool_recycle", 1800)
    if "poolclass" not in kwargs:
        # Up to 30 connections, opened on demand and all kept: with a smaller pool plus
        # overflow, every request past the pool size opened a connection and closed it again
        # (a Postgres backend forked per request: psycopg's connect was in the top frames of
        # the API under 50 concurrent clients).
        kwargs.setdefault("pool_size", 30)
        kwargs.setdefault("max_overflow", 0)
    return create_engine(url, **kwargs)


class Database:
    """An engine plus its session factory, built from settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.resolved_database_url)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error."""
        session = self.sessionmaker()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


_database: Database | None = None


def get_database() -> Database:
    global _database
    if _database is None:
        _database = Database(get_settings())
    return _database


def set_database(database: Database | None) -> None:
    """Swap the process-wide database (tests and `tracelearn up` call this)."""
    global _database
    if _database is not None and _database is not database:
        _database.dispose()
    _database = database


@contextmanager
def session_scope() -> Iterator[Session]:
    with get_database().session() as session:
        yield session


T = TypeVar("T")


def first_statement(session: Session, run: Callable[[], T]) -> T:
    """Run the first statement of ``session``'s transaction, once more on a new connection when
    the pooled one turned out dead: nothing ran in the transaction yet, so beginning it again
    is safe. Anything later in a transaction is not retried (what it wrote may be lost), and
    fails as it always did (503 + Retry-After)."""
    fresh = not session.in_transaction()
    try:
        return run()
    except DBAPIError as exc:
        if not (fresh and exc.connection_invalidated):
            raise
        session.rollback()
        return run()


def upsert_insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT construct, which has ``on_conflict_do_nothing/update`` on both
    Postgres and SQLite (the only two databases we run on)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)
    raise RuntimeError(f"unsupported database dialect {name!r}")


def _json_column_expression(column: Any) -> str:
    """How ``json_array_insert_sql`` reads ``column`` from a row's JSON object ``r``: JSON
    columns as the JSON value itself (a JSON ``null`` stays ``'null'``, as SQLAlchemy stores
    ``None``), strings as text (assigned to ``varchar(n)``, a value too long fails as it would
    when bound, where a cast would cut it), the others as text cast to the column's type."""
    name, sql_type = column.name, column.type.compile(postgresql.dialect())
    if sql_type == "JSONB":
        return f"r->'{name}'"
    if sql_type == "TEXT" or sql_type.startswith("VARCHAR"):
        return f"r->>'{name}'"
    return f"(r->>'{name}')::{sql_type}"


# Rows per JSON parameter: a 1,000-trace batch (the API's limit) fits in one statement.
_JSON_ARRAY_CHUNK = 5000


def execute_json_array(
    session: Session, statement: Executable, rows: Sequence[dict[str, Any]]
) -> list[Any]:
    """Run a ``json_array_insert_sql`` statement (parameter ``:rows``) over ``rows``, the rows
    as one JSON array a chunk; what its RETURNING gives, if it has one."""
    returned: list[Any] = []
    for i in range(0, len(rows), _JSON_ARRAY_CHUNK):
        result = cast("CursorResult[Any]", session.execute(
            statement, {"rows": json_dumps(rows[i : i + _JSON_ARRAY_CHUNK])}))
        if result.returns_rows:
            returned += result.all()
    return returned


def json_array_insert_sql(model: type[Base], parameter: str = ":rows") -> str:
    """Postgres: ``INSERT INTO`` the model's table ``(every column but id) SELECT … FROM
    jsonb_array_elements(CAST(parameter AS jsonb)) AS r``, to which a caller adds its ``ON
    CONFLICT`` and ``RETURNING``. All rows travel as one JSON array (``json_dumps``) in one short
    statement: a multi-row VALUES clause has a parameter per column and row, and psycopg
    re-parses a query text that long on every execution (it caches only short ones), which cost
    more than the database's work. Every row must carry every column: Python-side defaults are
    not applied."""
    table = cast(Table, model.__table__)
    columns = [c for c in table.columns if c.name != "id"]
    return (
        f"INSERT INTO {table.name} ({', '.join(c.name for c in columns)}) "
        f"SELECT {', '.join(_json_column_expression(c) for c in columns)} "
        f"FROM jsonb_array_elements(CAST({parameter} AS jsonb)) AS r"
    )
