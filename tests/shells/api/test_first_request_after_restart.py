"""After the database dropped every pooled connection (a restart), the very next /readyz, the
very next dashboard page and the very next authenticated API request succeed: their first
statement is retried once on a fresh connection (``app.db.first_statement``)."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.db import Database
from tests.conftest import PG_ADMIN_DSN
from tests.support.dashboard import sign_in

pytestmark = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


def drop_every_connection(database: Database) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database.engine.url.database,)).fetchone()
    assert killed is not None and killed[0] >= 1


def test_readyz_answers_200_on_the_first_call_after_the_connections_died(
    client: TestClient, database: Database
) -> None:
    assert client.get("/readyz").status_code == 200
    drop_every_connection(database)
    r = client.get("/readyz")
    assert r.status_code == 200, r.text


def test_a_dashboard_page_loads_on_the_first_call_after_the_connections_died(
    client: TestClient, database: Database, make_key: Callable[..., str], tenant: str
) -> None:
    sign_in(client, make_key(tenant, "ingest,read,admin"))
    assert client.get("/dashboard").status_code == 200
    drop_every_connection(database)
    r = client.get("/dashboard")
    assert r.status_code == 200 and "Policies" in r.text, r.text[:300]


def test_an_authenticated_request_succeeds_on_the_first_call_after_the_connections_died(
    client: TestClient, database: Database, admin_headers: dict[str, str]
) -> None:
    """Auth's counters read runs in autocommit (``app.cache.read_request_generations``): its
    retry on a fresh connection must hold there too."""
    assert client.get("/v1/policies", headers=admin_headers).status_code == 200
    drop_every_connection(database)
    r = client.get("/v1/policies", headers=admin_headers)
    assert r.status_code == 200, r.text
