"""The Langfuse Python SDK (v2, which posts to `/api/public/ingestion`) pointed at tracelearn:
generations become traces, scores become outcomes, each event is answered on its own."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langfuse import Langfuse

from tests.conftest import LiveServer
from tests.support.live_api import stored_trace as stored

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Use the weather tool."},
    {"role": "user", "content": "Weather in Paris?"},
]
TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
def http(live_server: LiveServer, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as client:
        yield client


@pytest.fixture
def policy(http: httpx.Client) -> str:
    name = f"p-{uuid.uuid4().hex[:10]}"
    assert http.post("/v1/policies", json={"name": name, "redaction_enabled": False}
                     ).status_code == 201
    return name


@pytest.fixture
def langfuse(live_server: LiveServer, key: str) -> Iterator[Langfuse]:
    public = "_".join(key.split("_", 2)[:2])  # tl_<prefix>
    client = Langfuse(public_key=public, secret_key=key, host=live_server.url, flush_at=100)
    yield client
    client.shutdown()


def test_a_tool_calling_generation_becomes_a_trace_and_its_score_an_outcome(
    langfuse, http, policy
):
    trace = langfuse.trace(name="weather", user_id="u-1", session_id="s-1", tags=["agent"],
                           metadata={"policy": policy})
    trace.span(name="retrieve", input="q", output="docs").end()
    gen = trace.generation(name="chat", model="gpt-4o-mini",
                           model_parameters={"temperature": 0.2, "max_tokens": 64},
                           input=MESSAGES)
    gen.end(output={"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            usage={"input": 20, "output": 5})
    trace.event(name="clicked")
    trace.score(name="correct", value=1)
    langfuse.flush()

    got = stored(http, gen.id)
    assert got is not None
    assert got["messages"] == MESSAGES
    assert got["response"] == {"role": "assistant", "tool_calls": [TOOL_CALL]}
    assert got["sampling_params"] == {"temperature": 0.2, "max_tokens": 64}
    assert got["usage"] == {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
    assert (got["user_id"], got["session_id"], got["tags"]) == ("u-1", "s-1", ["agent"])
    assert got["model"] == "gpt-4o-mini" and got["metadata"]["source"] == "langfuse"
    assert [(o["name"], o["value"]) for o in got["outcomes"]] == [("correct", 1)]


def test_a_generation_split_across_batches_is_ingested_once_complete(langfuse, http, policy):
    trace = langfuse.trace(name="two-batches", metadata={"policy": policy})
    gen = trace.generation(name="chat", input=MESSAGES)
    langfuse.flush()
    assert stored(http, gen.id) is None  # staged: no output yet
    gen.end(output="It is sunny.")
    langfuse.flush()
    got = stored(http, gen.id)
    assert got is not None and got["response"] == "It is sunny."
    langfuse.flush()  # nothing new: still one trace
    assert len(http.get("/v1/traces", params={"policy": policy}).json()["items"]) == 1


def test_each_event_is_answered_on_its_own_with_207(live_server, key, http, policy):
    public = "_".join(key.split("_", 2)[:2])
    auth = base64.b64encode(f"{public}:{key}".encode()).decode()
    batch = [
        {"id": "e1", "type": "trace-create", "timestamp": "2026-12-01T00:00:00Z",
         "body": {"id": "lt-1"}},
        {"id": "e2", "type": "generation-create", "timestamp": "2026-12-01T00:00:00Z",
         "body": {"id": "g-1", "traceId": "lt-1", "input": MESSAGES, "output": "ok",
                  "metadata": {"policy": policy}}},
        {"id": "e3", "type": "generation-create", "timestamp": "2026-12-01T00:00:00Z",
         "body": {"id": "g-2", "traceId": "lt-1", "input": MESSAGES, "output": "ok"}},
        {"id": "e4", "type": "score-create", "timestamp": "2026-12-01T00:00:00Z",
         "body": {"traceId": "nobody", "name": "x", "value": 1}},
        {"id": "e5", "type": "dataset-run", "body": {}},
    ]
    r = httpx.post(f"{live_server.url}/api/public/ingestion", json={"batch": batch},
                   headers={"Authorization": f"Basic {auth}"})
    assert r.status_code == 207, r.text
    assert [s["id"] for s in r.json()["successes"]] == ["e1", "e2"]
    assert [(e["id"], e["status"]) for e in r.json()["errors"]] == [
        ("e3", 422), ("e4", 404), ("e5", 400)]
    assert "metadata.policy" in r.json()["errors"][0]["message"]
    assert stored(http, "g-1") is not None and stored(http, "g-2") is None


def test_wrong_secret_is_401_and_a_read_only_key_is_403(live_server, key, make_key):
    public = "_".join(key.split("_", 2)[:2])
    for secret, status in ((key[:-1] + "x", 401), (make_key("t-ro", "read"), 403)):
        user = public if status == 401 else "_".join(secret.split("_", 2)[:2])
        auth = base64.b64encode(f"{user}:{secret}".encode()).decode()
        r = httpx.post(f"{live_server.url}/api/public/ingestion", json={"batch": []},
                       headers={"Authorization": f"Basic {auth}"})
        assert r.status_code == status, r.text
