"""Property-based tests of ingest and feedback: whatever arrives, the answer is a 2xx/4xx, and what
the answer says was stored is exactly what is stored — no more, no less."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app.db import Database
from app.models import Outcome, Trace

SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large, HealthCheck.filter_too_much]

# Any text, including NUL, control characters and lone surrogates (sent as JSON escapes).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool"]) | any_text
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": any_text | json_values}), max_size=3
) | json_values


def traces(policy: str) -> st.SearchStrategy[Any]:
    external_ids = st.sampled_from(["a", "b", "c"]) | any_text | st.integers()
    outcome = st.fixed_dictionaries({"name": any_text, "value": json_values})
    item = st.fixed_dictionaries(
        {"external_id": external_ids, "policy": st.sampled_from([policy, "nope"]) | any_text,
         "messages": messages, "response": any_text | json_values},
        optional={"metadata": json_values, "outcome": outcome, "model": any_text | json_values,
                  "occurred_at": any_text, "extra": json_values},
    )
    return item | json_values


def body_bytes(payload: Any) -> bytes:
    # allow_nan: NaN/Infinity must be refused by the server, so let them through the client.
    return json.dumps(payload, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


def counts(database: Database, tenant: str) -> tuple[int, int]:
    with database.session() as s:
        t = s.scalar(select(func.count()).select_from(Trace).where(Trace.tenant == tenant))
        o = s.scalar(select(func.count()).select_from(Outcome).where(Outcome.tenant == tenant))
    return int(t or 0), int(o or 0)


def test_any_trace_batch_is_answered_2xx_or_4xx_and_the_answer_matches_storage(
    client: TestClient, database: Database, make_key: Callable[..., str]
) -> None:
    tenant = f"h-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {make_key(tenant)}", "content-type": "application/json"}
    policy = f"hp-{uuid.uuid4().hex[:8]}"
    assert client.post("/v1/policies", json={"name": policy}, headers=headers).status_code == 201
    stored: set[str] = set()

    @given(batch=st.lists(traces(policy), min_size=0, max_size=5), wrap=st.booleans())
    @settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
    def run(batch: list[Any], wrap: bool) -> None:
        payload: Any = {"traces": batch} if wrap or len(batch) != 1 else batch[0]
        before = counts(database, tenant)
        r = client.post("/v1/traces", content=body_bytes(payload), headers=headers)
        assert r.status_code < 500, r.text[:500]
        after = counts(database, tenant)
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith("application/problem+json")
            assert after[0] == before[0], "a refused request wrote traces"
            return
        results = r.json()["results"] if r.status_code == 207 else [r.json()]
        created = {x["external_id"] for x in results if x["status"] == "created"}
        for x in results:
            if x["status"] in ("created", "duplicate"):
                stored.add(x["external_id"])
                assert x["id"] is not None
        assert after[0] - before[0] == len(created)
        assert after[0] == len(stored)

    run()


def test_any_feedback_batch_is_answered_2xx_or_4xx(
    client: TestClient, database: Database, make_key: Callable[..., str]
) -> None:
    tenant = f"h-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {make_key(tenant)}", "content-type": "application/json"}
    item = st.fixed_dictionaries(
        {"name": any_text, "value": json_values},
        optional={"trace_external_id": any_text | json_values,
                  "trace_id": st.integers() | json_values,
                  "source": st.sampled_from(["api", "annotation", "eval"]) | any_text},
    ) | json_values

    @given(outcomes=st.lists(item, max_size=5) | json_values)
    @settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
    def run(outcomes: Any) -> None:
        before = counts(database, tenant)[1]
        r = client.post("/v1/feedback", content=body_bytes({"outcomes": outcomes}),
                        headers=headers)
        assert r.status_code < 500, r.text[:500]
        after = counts(database, tenant)[1]
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith("application/problem+json")
            assert after == before
            return
        accepted = [x for x in r.json()["results"] if x["status"] in ("stored", "pending_trace")]
        assert after - before <= len(accepted)

    run()
