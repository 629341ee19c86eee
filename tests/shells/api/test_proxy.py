"""The OpenAI-compatible logging proxy: answered by the serving snapshot, recorded as a trace."""

from __future__ import annotations

import json

import psycopg
import pytest

from app.engines import set_engine_override
from tests.conftest import bearer
from tests.support.seeding import DownEngine, ScriptedEngine

MESSAGES = [{"role": "system", "content": "Answer YES or NO."},
            {"role": "user", "content": "ECOG 0, EGFR positive on osimertinib. PFS > 180 d?"}]


def _trace(client, headers, external_id):
    r = client.get("/v1/traces", params={"external_id": external_id}, headers=headers)
    assert r.status_code == 200, r.text
    items = [t for t in r.json()["items"] if t["external_id"] == external_id]
    return items[0] if items else None


def test_completion_is_answered_by_the_serving_snapshot_and_recorded(
    client, admin_headers, policy_name, serving_engine
):
    r = client.post("/v1/chat/completions", headers=admin_headers,
                    json={"model": policy_name, "messages": MESSAGES, "max_tokens": 12,
                          "seed": 1, "metadata": {"request": "r-1"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == f"{policy_name}-v0"
    assert body["usage"]["completion_tokens"] >= 1
    assert r.headers["x-tracelearn-trace-status"] == "created"
    trace = _trace(client, admin_headers, body["id"])
    assert trace["response"] == body["choices"][0]["message"]["content"]
    assert trace["model"] == f"{policy_name}-v0" and trace["snapshot_id"] is not None
    assert trace["metadata"]["source"] == "proxy" and trace["metadata"]["request"] == "r-1"


def test_after_promotion_the_proxy_serves_and_records_the_new_snapshot(
    client, admin_headers, policy_name, candidate
):
    sid = candidate()
    client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers)
    r = client.post("/v1/chat/completions", headers=admin_headers,
                    json={"model": policy_name, "messages": MESSAGES, "max_tokens": 8})
    assert r.json()["model"] == f"{policy_name}-v1"
    assert _trace(client, admin_headers, r.json()["id"])["snapshot_id"] == sid


def test_streaming_sends_sse_chunks_and_records_the_whole_answer(
    client, admin_headers, policy_name, serving_engine
):
    with client.stream("POST", "/v1/chat/completions", headers=admin_headers,
                       json={"model": policy_name, "messages": MESSAGES, "max_tokens": 12,
                             "stream": True, "seed": 2}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")  # 12 tokens may cut
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    trace = _trace(client, admin_headers, chunks[0]["id"])
    assert trace is not None and trace["response"] == text


def test_client_chosen_id_makes_retries_idempotent(
    client, admin_headers, policy_name, serving_engine
):
    headers = admin_headers | {"X-Tracelearn-External-Id": "req-42"}
    body = {"model": policy_name, "messages": MESSAGES, "max_tokens": 6, "seed": 3,
            "temperature": 0}
    first = client.post("/v1/chat/completions", headers=headers, json=body)
    again = client.post("/v1/chat/completions", headers=headers, json=body)
    assert first.json()["id"] == "req-42"
    assert first.headers["x-tracelearn-trace-status"] == "created"
    assert again.headers["x-tracelearn-trace-status"] == "duplicate"


def test_unknown_policy_is_404(client, admin_headers, serving_engine):
    r = client.post("/v1/chat/completions", headers=admin_headers,
                    json={"model": "no-such-policy", "messages": MESSAGES})
    assert r.status_code == 404


def test_engine_down_is_503_and_records_nothing(client, admin_headers, policy_name):
    set_engine_override(DownEngine())
    try:
        r = client.post("/v1/chat/completions", headers=admin_headers,
                        json={"model": policy_name, "messages": MESSAGES})
    finally:
        set_engine_override(None)
    assert r.status_code == 503
    traces = client.get("/v1/traces", headers=admin_headers).json()["items"]
    assert traces == []


def test_proxy_needs_the_ingest_scope(client, make_key, tenant, policy_name):
    r = client.post("/v1/chat/completions", headers=bearer(make_key(tenant, "read")),
                    json={"model": policy_name, "messages": MESSAGES})
    assert r.status_code == 403


class WatchingEngine(ScriptedEngine):
    """Counts, while it generates, the connections of the test database that sit idle inside
    a transaction."""

    def __init__(self, dsn: str) -> None:
        super().__init__(["YES"])
        self.dsn = dsn
        self.idle_in_transaction: int | None = None

    def stream(self, model, messages, params):  # type: ignore[no-untyped-def]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                               "current_database() AND state = 'idle in transaction'").fetchone()
        self.idle_in_transaction = row[0] if row else None
        yield from super().stream(model, messages, params)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_no_connection_idles_in_a_transaction_while_the_model_writes(
    client, admin_headers, policy_name, db_url
):
    engine = WatchingEngine(db_url.replace("postgresql+psycopg://", "postgresql://"))
    set_engine_override(engine)
    try:
        r = client.post("/v1/chat/completions", headers=admin_headers,
                        json={"model": policy_name, "messages": MESSAGES})
    finally:
        set_engine_override(None)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "YES"
    assert engine.idle_in_transaction == 0
    assert _trace(client, admin_headers, r.json()["id"])["response"] == "YES"
