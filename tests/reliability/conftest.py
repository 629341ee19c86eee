"""Fixtures for fault and load tests: private Postgres and Redis that a test may stop, and the
process-wide settings pointed at them (restored afterwards)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from app import migrate
from app.db import Database, set_database
from app.dependencies import rate_limiter
from app.settings import Settings, set_settings

from ._support import PrivateCluster, PrivateRedis, pg_available

SHARED_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "faults: stops/kills services or processes (private ones here); bounded, self-restoring",
    )


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivateCluster]:
    if not pg_available():
        pytest.fail("Postgres server binaries (initdb, pg_ctl) are needed for the fault tests")
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    redis = PrivateRedis()
    try:
        yield redis
    finally:
        redis.destroy()


def use_settings(settings: Settings) -> Database:
    """Point the process at ``settings`` (API, services, jobs) and return its database."""
    set_settings(settings)
    database = Database(settings)
    set_database(database)
    rate_limiter.reset()
    return database


@pytest.fixture
def restore_settings() -> Iterator[None]:
    yield
    set_database(None)
    set_settings(None)


def fault_settings(database_url: str, data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "data_dir": data_dir,
        "environment": "test",
        "log_level": "WARNING",
        "rate_limit_per_minute": 0,
        "task_always_eager": True,
    }
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    migrate.upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A new database on the shared server (migrated by ``fault_settings``), dropped after:
    its jobs table is ours alone, so outbox counts are exact."""
    name = f"tl_fault_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(SHARED_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        from app.db import set_database

        set_database(None)  # close our pool before dropping
        with psycopg.connect(SHARED_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
