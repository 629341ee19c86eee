"""Hostile strings anywhere are a 4xx, never a 5xx, and nothing is written for them.

Every string the API and the proxy accept passes one check (``app.traces.strings``): lone
surrogates, NUL and the other C0 controls (tab, newline and carriage return excepted) and
over-long strings are refused, keys of free-form JSON (``metadata``) included. Non-NFC text is
not hostile: it is stored as given. In a batch the poisoned item alone is ``invalid``.

Bodies are written by hand: ``\\ud800`` in JSON is a lone surrogate escape, which ``json.dumps``
of a Python string cannot produce without ``surrogatepass``.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.engines import set_engine_override
from tests.support.seeding import ScriptedEngine

from ._helpers import assert_problem, trace_body

JSON = {"content-type": "application/json"}
Counts = Callable[[str], tuple[int, int]]

# A fragment of JSON text that puts a hostile string somewhere a client may send one.
HOSTILE_METADATA = {
    "surrogate-value": '{"k": "a\\ud800b"}',
    "low-surrogate-value": '{"k": "\\udfff"}',
    "surrogate-key": '{"\\ud800": 1}',
    "surrogate-deep": '{"deep": [{"x": ["\\udbff"]}]}',
    "bell-value": '{"k": "a\\u0007b"}',
    "escape-key": '{"\\u001b[31m": 1}',
    "backspace-escape": '{"k": "a\\bb"}',
    "form-feed-key": '{"a\\f": 1}',
    "nul-value": '{"k": "a\\u0000b"}',
    "overlong-key": json.dumps({"k" * 257: 1}),
}


def raw_post(client: TestClient, path: str, body: str | bytes, headers: dict[str, str]) -> Any:
    data = body.encode() if isinstance(body, str) else body
    return client.post(path, content=data, headers={**headers, **JSON})


def with_field(item: dict[str, Any], name: str, fragment: str) -> str:
    """The item's JSON text with ``"name": fragment`` appended."""
    return json.dumps(item)[:-1] + f', "{name}": {fragment}' + "}"


def test_hostile_metadata_in_a_single_trace_is_422_and_stores_nothing(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    for case, fragment in HOSTILE_METADATA.items():
        body = with_field(trace_body(f"s-{case}", policy_name), "metadata", fragment)
        problem = assert_problem(raw_post(client, "/v1/traces", body, admin_headers), 422)
        assert problem["errors"][0]["loc"][0] == "metadata", (case, problem)
    assert stored_counts(tenant) == (0, 0)


def test_hostile_metadata_in_a_batch_makes_that_item_invalid_and_keeps_the_rest(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    for n, (case, fragment) in enumerate(HOSTILE_METADATA.items()):
        good = json.dumps(trace_body(f"good-{n}", policy_name))
        bad = with_field(trace_body(f"bad-{n}", policy_name), "metadata", fragment)
        r = raw_post(client, "/v1/traces", '{"traces": [' + good + ", " + bad + "]}",
                     admin_headers)
        assert r.status_code == 207, (case, r.status_code, r.text[:300])
        results = r.json()["results"]
        assert [x["status"] for x in results] == ["created", "invalid"], case
        assert results[1]["external_id"] == f"bad-{n}"
        assert results[1]["error"]["status"] == 422
    assert stored_counts(tenant) == (len(HOSTILE_METADATA), 0)


def test_surrogate_in_a_batch_items_external_id_is_invalid_and_not_echoed(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    good = json.dumps(trace_body("good", policy_name))
    bad = json.dumps(trace_body("PLACEHOLDER", policy_name)).replace("PLACEHOLDER", "e\\ud800")
    r = raw_post(client, "/v1/traces", '{"traces": [' + good + ", " + bad + "]}", admin_headers)
    assert r.status_code == 207, r.text[:300]
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["created", "invalid"]
    assert results[1]["external_id"] is None
    assert stored_counts(tenant) == (1, 0)


def test_control_characters_in_any_trace_string_are_refused_tab_and_newline_kept(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    for char in ("\\u0001", "\\u0007", "\\u001f", "\\b", "\\f"):
        for field in ("Patient note", "Reasoning... ANSWER: YES"):
            body = json.dumps(trace_body("c", policy_name)).replace(field, field + char)
            assert_problem(raw_post(client, "/v1/traces", body, admin_headers), 422)
        body = json.dumps(trace_body("c", policy_name, tags=["ok", "PLACE"]))
        r = raw_post(client, "/v1/traces", body.replace("PLACE", "t" + char), admin_headers)
        assert_problem(r, 422)
    assert stored_counts(tenant) == (0, 0)
    text = "line one\n\tindented\r\nline two"
    r = client.post("/v1/traces", json=trace_body("ws", policy_name, text,
                                                  metadata={"k\tv": "a\nb"}),
                    headers=admin_headers)
    assert r.status_code == 201, r.text
    stored = client.get(f"/v1/traces/{r.json()['id']}", headers=admin_headers).json()
    assert stored["messages"][0]["content"] == text
    assert stored["metadata"] == {"k\tv": "a\nb"}


def test_non_nfc_text_is_stored_as_given(
    client: TestClient, admin_headers: dict[str, str], policy_name: str
) -> None:
    decomposed = "Cafe\u0301 re\u0301sume\u0301"  # NFD: e + combining acute accent
    assert unicodedata.normalize("NFC", decomposed) != decomposed
    r = client.post("/v1/traces", json=trace_body("nfd", policy_name, decomposed,
                                                  metadata={decomposed: decomposed}),
                    headers=admin_headers)
    assert r.status_code == 201, r.text
    stored = client.get(f"/v1/traces/{r.json()['id']}", headers=admin_headers).json()
    assert stored["messages"][0]["content"] == decomposed
    assert stored["metadata"] == {decomposed: decomposed}


def test_hostile_feedback_items_are_invalid_and_the_rest_stored(
    client: TestClient, admin_headers: dict[str, str], tenant: str, stored_counts: Counts,
) -> None:
    items = [
        '{"trace_external_id": "ok", "name": "n", "value": 1}',
        '{"trace_external_id": "e\\ud800", "name": "n", "value": 1}',
        '{"trace_external_id": "e", "name": "n\\udc00", "value": 1}',
        '{"trace_external_id": "e", "name": "n", "value": "v\\ud800"}',
        '{"trace_external_id": "e\\u0007", "name": "n", "value": 1}',
        '{"trace_external_id": "e", "name": "n", "value": "v\\u0000"}',
    ]
    r = raw_post(client, "/v1/feedback", '{"outcomes": [' + ", ".join(items) + "]}",
                 admin_headers)
    assert r.status_code == 207, r.text[:300]
    assert [x["status"] for x in r.json()["results"]] == ["pending_trace"] + ["invalid"] * 5
    assert stored_counts(tenant) == (0, 1)


def test_hostile_strings_in_an_inline_outcome_are_refused(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    for fragment in ('{"name": "n\\ud800", "value": 1}', '{"name": "n", "value": "\\ud800"}',
                     '{"name": "n\\u0002", "value": 1}'):
        body = with_field(trace_body("io", policy_name), "outcome", fragment)
        assert_problem(raw_post(client, "/v1/traces", body, admin_headers), 422)
    assert stored_counts(tenant) == (0, 0)


def test_hostile_strings_in_other_routes_are_422(
    client: TestClient, admin_headers: dict[str, str], tenant: str
) -> None:
    for name in ("p\\ud800", "p\\u0007"):
        body = '{"name": "' + name + '"}'
        assert_problem(raw_post(client, "/v1/policies", body, admin_headers), 422)
    body = '{"name": "pol", "grader_spec": {"\\ud800": 1}}'
    assert_problem(raw_post(client, "/v1/policies", body, admin_headers), 422)


# ------------------------------------------------------------------------------ the proxy


class CountingEngine(ScriptedEngine):
    """An engine that answers a fixed text and counts its generations."""

    def __init__(self, text: str = "ANSWER: YES") -> None:
        super().__init__([text])


@pytest.fixture
def counting_engine() -> Iterator[CountingEngine]:
    engine = CountingEngine()
    set_engine_override(engine)
    yield engine
    set_engine_override(None)


def proxy_body(policy: str, **extra: str) -> str:
    base = {"model": policy, "messages": [{"role": "user", "content": "PFS > 180 d?"}]}
    text = json.dumps(base)[:-1]
    for name, fragment in extra.items():
        text += f', "{name}": {fragment}'
    return text + "}"


PROXY_CASES = {
    "metadata-value": {"metadata": '{"k": "\\ud800"}'},
    "metadata-key": {"metadata": '{"\\ud800": "v"}'},
    "metadata-control": {"metadata": '{"k": "\\u0007"}'},
    "metadata-nul": {"metadata": '{"k": "\\u0000"}'},
    "user": {"user": '"u\\ud800"'},
    "content": {"messages": '[{"role": "user", "content": "x\\ud800"}]'},
    "stop": {"stop": '["\\ud800"]'},
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_hostile_strings_through_the_proxy_are_refused_before_generation(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts, counting_engine: CountingEngine, stream: bool,
) -> None:
    for case, fields in PROXY_CASES.items():
        body = proxy_body(policy_name, **fields, stream="true" if stream else "false")
        r = raw_post(client, "/v1/chat/completions", body, admin_headers)
        assert r.status_code == 400, (case, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error", case
    assert counting_engine.calls == 0
    assert stored_counts(tenant) == (0, 0)
    r = raw_post(client, "/v1/chat/completions", proxy_body(policy_name), admin_headers)
    assert r.status_code == 200, r.text
    assert stored_counts(tenant) == (1, 0)


def test_control_characters_the_model_generates_are_recorded_as_generated(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
) -> None:
    # Tiny models do emit U+0004 and friends: the answer is the model's behaviour, so the trace
    # keeps it; only a NUL, which no database column holds, is replaced.
    engine = CountingEngine(text="bell \x07 eot \x04 nul \x00 end")
    set_engine_override(engine)
    try:
        r = raw_post(client, "/v1/chat/completions", proxy_body(policy_name), admin_headers)
    finally:
        set_engine_override(None)
    assert r.status_code == 200, r.text
    assert r.headers["x-tracelearn-trace-status"] == "created"
    listed = client.get("/v1/traces", params={"external_id": r.json()["id"]},
                        headers=admin_headers).json()["items"]
    assert listed[0]["response"] == "bell \x07 eot \x04 nul \ufffd end"


def test_an_answer_that_cannot_be_stored_is_counted_not_lost_silently(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    from app.proxy.service import TRACES_UNRECORDED

    engine = CountingEngine(text="x" * 200_001)  # beyond the longest storable string
    before = TRACES_UNRECORDED.labels("invalid")._value.get()
    set_engine_override(engine)
    try:
        r = raw_post(client, "/v1/chat/completions", proxy_body(policy_name), admin_headers)
    finally:
        set_engine_override(None)
    assert r.status_code == 200, r.text
    assert r.headers["x-tracelearn-trace-status"] == "invalid"
    assert TRACES_UNRECORDED.labels("invalid")._value.get() == before + 1
    assert stored_counts(tenant) == (0, 0)
