"""Shared fixtures: real Postgres (a fresh database per test session, created and dropped here),
SQLite files, the ASGI app over real HTTP semantics, API keys."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
import uvicorn
from fastapi.testclient import TestClient

from app import migrate
from app.auth.service import create_key
from app.db import Database, set_database
from app.dependencies import rate_limiter
from app.main import create_app
from app.settings import Settings, set_settings
from benchmarks._common import stop_process, wait_healthy

# .ci/run installs everything the suite needs (vLLM, Chromium, trl), so in CI a missing piece is a
# failure: a skipped vLLM or browser test there would hide exactly what CI exists to prove.
IN_CI = bool(os.environ.get("CI"))

# Fixtures shared across the tree (the model, adapters, engines, workers, dashboard sign-in).
pytest_plugins = [
    "tests.support.pipeline",
    "tests.support.promotion",
    "tests.support.learner",
    "tests.support.dashboard",
    "tests.support.live_api",
]


def skip_or_fail(reason: str) -> NoReturn:
    """``pytest.skip`` on a developer machine, ``pytest.fail`` in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI installs it, so this is a failure)", pytrace=False)
    pytest.skip(reason)


PG_ADMIN_DSN = os.environ.get(
    "TRACELEARN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _pg_up() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def ensure_postgres() -> None:
    if _pg_up():
        return
    # The machine's own cluster, started the way the environment documents.
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if versions:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
            check=False,
            capture_output=True,
        )
    for _ in range(30):
        if _pg_up():
            return
        time.sleep(1)
    pytest.exit("Postgres is not reachable at 127.0.0.1:5432 and could not be started", 2)


def create_pg_database(prefix: str = "tl_test") -> str:
    ensure_postgres()
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_url_for(name: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = create_pg_database()
    url = pg_url_for(name)
    migrate.upgrade(url)
    yield url
    drop_pg_database(name)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'tracelearn.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once on Postgres and once on SQLite."""
    fixture = "pg_url" if request.param == "postgres" else "sqlite_url"
    return str(request.getfixturevalue(fixture))


def make_settings(database_url: str, data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "data_dir": data_dir,
        "environment": "test",
        "log_json": True,
        "log_level": "WARNING",
        "task_always_eager": True,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Iterator[Settings]:
    s = make_settings(db_url, tmp_path / "data")
    set_settings(s)
    database = Database(s)
    set_database(database)
    rate_limiter.reset()
    yield s
    set_database(None)
    set_settings(None)


@pytest.fixture
def database(settings: Settings) -> Database:
    from app.db import get_database

    return get_database()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_key(database: Database) -> Callable[..., str]:
    def _make(tenant: str, scopes: str = "ingest,read,admin") -> str:
        with database.session() as session:
            return create_key(session, tenant, scopes, name="test").secret

    return _make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def admin_headers(make_key: Callable[..., str], tenant: str) -> dict[str, str]:
    return bearer(make_key(tenant, "ingest,read,admin"))


@pytest.fixture
def policy_name(client: TestClient, admin_headers: dict[str, str]) -> str:
    name = f"p-{uuid.uuid4().hex[:10]}"
    r = client.post("/v1/policies", json={"name": name}, headers=admin_headers)
    assert r.status_code == 201, r.text
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn serving the app on a loopback port in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(settings) as server:
        yield server


REPO = Path(__file__).resolve().parents[1]


@contextmanager
def api_process(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`tracelearn api` as production runs it, in its own process on a free port, with ``env``
    added to ours and its output in ``log_path``; yields its URL once ``/healthz`` answers."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api", "--port", str(port), "--workers", "1"],
            cwd=REPO, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # Generous: a loaded 2-core machine has taken over 30 s to import and start.
        wait_healthy(url, proc, log_path, timeout_s=90)
        yield url
    finally:
        stop_process(proc)
