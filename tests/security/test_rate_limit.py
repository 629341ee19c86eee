"""Per-key rate limits: 429 problem+json with Retry-After, per key, configurable, recovering."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings, set_settings

from ._helpers import assert_problem

PER_MINUTE = 60  # one token a second: a burst of 60 is allowed, then one a second


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    # The limiter is in-process and database-independent; SQLite keeps the burst quick.
    return sqlite_url


@pytest.fixture
def limited_client(settings: Settings) -> Iterator[TestClient]:
    limited = settings.model_copy(update={"rate_limit_per_minute": PER_MINUTE})
    set_settings(limited)
    with TestClient(create_app(limited), raise_server_exceptions=False) as c:
        yield c
    set_settings(settings)


def test_burst_beyond_the_limit_is_429_with_retry_after_and_recovers(
    limited_client: TestClient, make_key: Callable[..., str], tenant: str
) -> None:
    h = {"Authorization": f"Bearer {make_key(tenant, 'read')}"}
    codes = [limited_client.get("/v1/policies", headers=h).status_code for _ in range(PER_MINUTE)]
    assert codes.count(200) >= PER_MINUTE - 2  # refill during the burst may add a token or two
    r = None
    # Each request costs a token and the bucket refills one a second: on a loaded machine where
    # requests take ~100 ms, ten tries could all be refilled; sixty drain it at ≤ 1 s each.
    for _ in range(PER_MINUTE):
        r = limited_client.get("/v1/policies", headers=h)
        if r.status_code == 429:
            break
    assert r is not None and r.status_code == 429
    body = assert_problem(r, 429)
    assert body["type"].endswith("/rate-limited")
    retry_after = int(r.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    time.sleep(retry_after + 0.1)
    assert limited_client.get("/v1/policies", headers=h).status_code == 200


def test_one_keys_burst_does_not_limit_another_key(
    limited_client: TestClient, make_key: Callable[..., str], tenant: str
) -> None:
    noisy = {"Authorization": f"Bearer {make_key(tenant, 'read')}"}
    quiet = {"Authorization": f"Bearer {make_key(tenant, 'read')}"}
    for _ in range(PER_MINUTE + 5):
        limited_client.get("/v1/policies", headers=noisy)
    assert limited_client.get("/v1/policies", headers=noisy).status_code == 429
    assert limited_client.get("/v1/policies", headers=quiet).status_code == 200


def test_a_limit_of_zero_disables_limiting(
    settings: Settings, make_key: Callable[..., str], tenant: str
) -> None:
    unlimited = settings.model_copy(update={"rate_limit_per_minute": 0})
    set_settings(unlimited)
    try:
        with TestClient(create_app(unlimited)) as c:
            h = {"Authorization": f"Bearer {make_key(tenant, 'read')}"}
            assert {c.get("/v1/policies", headers=h).status_code for _ in range(PER_MINUTE + 20)} == {200}
    finally:
        set_settings(settings)


def test_unauthenticated_requests_are_refused_before_costing_a_token(
    limited_client: TestClient, make_key: Callable[..., str], tenant: str
) -> None:
    # Refusals for bad keys must not drain a real key's budget (they carry no key id).
    for _ in range(PER_MINUTE + 5):
        assert limited_client.get("/v1/policies",
                                  headers={"Authorization": "Bearer tl_x_y"}).status_code == 401
    h = {"Authorization": f"Bearer {make_key(tenant, 'read')}"}
    assert limited_client.get("/v1/policies", headers=h).status_code == 200
