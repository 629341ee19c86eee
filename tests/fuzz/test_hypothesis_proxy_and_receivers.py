"""Property-based tests of the proxy, the Langfuse and the OTLP receivers with strings from the whole
code-point range (lone surrogates included): never a 5xx, and a refusal writes nothing."""

from __future__ import annotations

import base64
import json
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


def test_any_otlp_json_export_is_answered_below_500_and_rejected_spans_store_nothing(
    client: TestClient, database: Database, make_key: Callable[..., str]
) -> None:
    tenant = f"h-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {make_key(tenant)}", "content-type": "application/json"}
    policy = f"hp-{uuid.uuid4().hex[:8]}"
    assert client.post("/v1/policies", json={"name": policy}, headers=headers).status_code == 201

    def attr(key: str, value: Any) -> dict[str, Any]:
        return {"key": key, "value": value}

    text_value = any_text.map(lambda s: {"stringValue": s})
    odd_value = (text_value | st.floats().map(lambda f: {"doubleValue": f})
                 | st.just({"doubleValue": "NaN"}) | json_values.map(lambda v: {"stringValue": v}))
    messages = st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "system", "assistant"]) | any_text,
        "parts": st.lists(st.fixed_dictionaries({"type": st.just("text"), "content": any_text}),
                          max_size=2)}), max_size=2)
    span = st.fixed_dictionaries({
        "traceId": st.just(uuid.uuid4().hex), "spanId": st.binary(min_size=8, max_size=8).map(
            bytes.hex),
        "name": any_text,
        "attributes": st.tuples(messages, messages, st.dictionaries(any_text, odd_value,
                                                                    max_size=2)).map(
            lambda t: [attr("gen_ai.operation.name", {"stringValue": "chat"}),
                       attr("tracelearn.policy", {"stringValue": policy}),
                       attr("gen_ai.input.messages", {"stringValue": json.dumps(t[0])}),
                       attr("gen_ai.output.messages", {"stringValue": json.dumps(t[1])}),
                       *(attr(k, v) for k, v in t[2].items())]),
        "events": st.lists(st.fixed_dictionaries({
            "name": st.just("gen_ai.evaluation.result") | any_text,
            "attributes": st.tuples(any_text, odd_value).map(
                lambda t: [attr("gen_ai.evaluation.name", {"stringValue": t[0]}),
                           attr("gen_ai.evaluation.score.value", t[1])])}), max_size=1),
    })
    answered: list[int] = []

    @given(spans=st.lists(span, min_size=1, max_size=3))
    @settings(max_examples=40, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
    def run(spans: list[Any]) -> None:
        before = counts(database, tenant)
        body = {"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}
        r = client.post("/otlp/v1/traces", content=body_bytes(body), headers=headers)
        assert r.status_code < 500, r.text[:500]
        answered.append(r.status_code)
        if r.status_code >= 400:
            assert counts(database, tenant) == before, "a refused request wrote rows"
            return
        rejected = int(r.json().get("partialSuccess", {}).get("rejectedSpans", 0))
        assert counts(database, tenant)[0] - before[0] <= len(spans) - rejected

    run()
    assert 200 in answered, answered


def test_any_otlp_json_log_export_is_answered_below_500(
    client: TestClient, database: Database, make_key: Callable[..., str]
) -> None:
    tenant = f"h-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {make_key(tenant)}", "content-type": "application/json"}
    value = (any_text.map(lambda s: {"stringValue": s}) | st.floats().map(
        lambda f: {"doubleValue": f}) | json_values.map(lambda v: {"stringValue": v}))
    record = st.fixed_dictionaries({
        "traceId": st.just(uuid.uuid4().hex),
        "spanId": st.binary(min_size=8, max_size=8).map(bytes.hex),
        "eventName": st.sampled_from(["gen_ai.user.message", "gen_ai.choice",
                                      "gen_ai.client.inference.operation.details",
                                      "gen_ai.evaluation.result"]) | any_text,
        "body": value,
        "attributes": st.dictionaries(any_text, value, max_size=3).map(
            lambda d: [{"key": k, "value": v} for k, v in d.items()]),
    })
    answered: list[int] = []

    @given(records=st.lists(record, min_size=1, max_size=3))
    @settings(max_examples=30, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
    def run(records: list[Any]) -> None:
        body = {"resourceLogs": [{"scopeLogs": [{"logRecords": records}]}]}
        r = client.post("/otlp/v1/logs", content=body_bytes(body), headers=headers)
        assert r.status_code < 500, r.text[:500]
        answered.append(r.status_code)

    run()
    assert 200 in answered, answered
