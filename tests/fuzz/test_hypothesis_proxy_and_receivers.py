"""Property-based tests of the proxy and the Langfuse receiver with strings from the whole
code-point range (lone surrogates included): never a 5xx, and a refusal writes nothing."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from app.db import Database
from app.engines import set_engine_override
from tests.security.test_hostile_strings import CountingEngine

from .test_hypothesis_ingest import SUPPRESS, any_text, body_bytes, counts, json_values


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
def engine() -> Iterator[CountingEngine]:
    e = CountingEngine()
    set_engine_override(e)
    yield e
    set_engine_override(None)


def test_any_proxy_request_is_answered_below_500_and_a_refusal_generates_and_stores_nothing(
    client: TestClient, database: Database, make_key: Callable[..., str], engine: CountingEngine
) -> None:
    tenant = f"h-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {make_key(tenant)}", "content-type": "application/json"}
    policy = f"hp-{uuid.uuid4().hex[:8]}"
    assert client.post("/v1/policies", json={"name": policy}, headers=headers).status_code == 201
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                     "content": any_text})
    request = st.fixed_dictionaries(
        {"model": st.just(policy), "messages": st.lists(message, min_size=1, max_size=2)},
        optional={"metadata": st.dictionaries(any_text, json_values, max_size=3),
                  "user": any_text, "stop": any_text, "stream": st.booleans()},
    )

    answered: list[int] = []

    @given(payload=request)
    @settings(max_examples=40, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
    def run(payload: dict[str, Any]) -> None:
        before, calls = counts(database, tenant), engine.calls
        r = client.post("/v1/chat/completions", content=body_bytes(payload), headers=headers)
        assert r.status_code < 500, r.text[:500]
        answered.append(r.status_code)
        if r.status_code >= 400:
            assert engine.calls == calls, "a refused request was generated"
            assert counts(database, tenant) == before, "a refused request wrote a trace"

    run()
    assert 200 in answered and 400 in answered, answered


def test_any_langfuse_batch_is_answered_below_500_and_refused_events_store_nothing(
    client: TestClient, database: Database, make_key: Callable[..., str]
) -> None:
    tenant = f"h-{uuid.uuid4().hex[:8]}"
    key = make_key(tenant)
    public = "_".join(key.split("_")[:2])
    basic = base64.b64encode(f"{public}:{key}".encode()).decode()
    headers = {"Authorization": f"Basic {basic}", "content-type": "application/json"}
    policy = f"hp-{uuid.uuid4().hex[:8]}"
    bearer = {"Authorization": f"Bearer {key}"}
    assert client.post("/v1/policies", json={"name": policy}, headers=bearer).status_code == 201
    body = st.fixed_dictionaries(
        {"id": any_text | st.sampled_from(["g1", "g2"]), "traceId": st.just("t1"),
         "input": any_text, "output": any_text},
        optional={"metadata": st.dictionaries(any_text, json_values, max_size=3),
                  "name": any_text, "value": json_values, "model": any_text},
    ).map(lambda b: b | {"metadata": {**b.get("metadata", {}), "policy": policy}})
    event = st.fixed_dictionaries({
        "id": any_text, "timestamp": st.just("2026-01-01T00:00:00Z"),
        "type": st.sampled_from(["generation-create", "score-create", "trace-create"]),
        "body": body,
    })

    answered: list[int] = []

    @given(batch=st.lists(event, max_size=4))
    @settings(max_examples=40, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
    def run(batch: list[Any]) -> None:
        before = counts(database, tenant)
        r = client.post("/api/public/ingestion", content=body_bytes({"batch": batch}),
                        headers=headers)
        assert r.status_code < 500, r.text[:500]
        answered.append(r.status_code)
        if r.status_code >= 400 or not r.json().get("successes"):
            assert counts(database, tenant) == before, "a refused batch wrote rows"

    run()
    assert 207 in answered, answered  # the credentials work: batches were really processed
