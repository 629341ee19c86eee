"""Schemathesis over the app's own OpenAPI schema: for every operation, generated requests
(valid and invalid) never get a 5xx, and documented responses match their schemas.

Bounded for the default suite (a few examples per operation, more for ingest and feedback);
the slow run goes deeper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.main import create_app
from app.settings import Settings

CHECKS = [schemathesis.checks.not_a_server_error, response_schema_conformance]
SUPPRESS = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors]


@pytest.fixture
def db_url(pg_url: str) -> str:
    # Postgres: the dialect that refuses NUL characters and out-of-range integers.
    return pg_url


@pytest.fixture
def fuzz_headers(make_key: Callable[..., str], tenant: str, client: TestClient,
                 settings: Settings) -> dict[str, str]:
    key = make_key(tenant, "ingest,read,admin")
    headers = {"Authorization": f"Bearer {key}"}
    # A real policy, so generated traces sometimes reach the insert path.
    client.post("/v1/policies", json={"name": "fuzz"}, headers=headers)
    return headers


# The schema is read at import time from an app built on default settings (no database is
# touched to serve /openapi.json); requests reach the database the fixtures configure. (The lazy
# `schemathesis.pytest.from_fixture` loader trips over pytest 9 internals.)
_app = create_app(Settings(environment="test", log_level="WARNING"))
schema = schemathesis.openapi.from_asgi("/openapi.json", _app)


def _check(case: Any, headers: dict[str, str]) -> None:
    response = case.call(headers=headers)
    assert response.status_code < 500, (case.method, case.path, response.status_code,
                                        response.text[:500])
    case.validate_response(response, checks=CHECKS)


@schema.parametrize()
@settings(max_examples=4, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
def test_no_operation_answers_5xx_and_responses_conform(
    case: Any, fuzz_headers: dict[str, str]
) -> None:
    _check(case, fuzz_headers)


ingest_schema = schema.include(path_regex=r"^/v1/(traces|feedback)$", method="POST")


@ingest_schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
def test_ingest_and_feedback_never_answer_5xx(case: Any, fuzz_headers: dict[str, str]) -> None:
    _check(case, fuzz_headers)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=300, deadline=None, suppress_health_check=SUPPRESS)
def test_deep_fuzz_every_operation(case: Any, fuzz_headers: dict[str, str]) -> None:
    _check(case, fuzz_headers)
