"""Bad input gets a clear 4xx problem+json and nothing half-written; a 5xx is a bug.

Runs on Postgres and SQLite: several of these (NUL characters, overflowing numbers) only ever
failed on Postgres, whose text and JSONB types refuse what SQLite stores silently. Cases of one
kind share a test (each assertion names its case) so the fixtures are paid once per kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings, set_settings

from ._helpers import assert_problem, trace_body

JSON = {"content-type": "application/json"}
Counts = Callable[[str], tuple[int, int]]


@pytest.fixture
def roomy_client(settings: Settings) -> Iterator[TestClient]:
    """A client whose app allows 10k items per batch and 8 MB bodies (the 10k-duplicates case)."""
    roomy = settings.model_copy(update={"max_batch_items": 10_000, "max_body_bytes": 8_000_000})
    set_settings(roomy)
    with TestClient(create_app(roomy), raise_server_exceptions=False) as c:
        yield c
    set_settings(settings)


def raw_post(client: TestClient, path: str, body: bytes, headers: dict[str, str]) -> Any:
    return client.post(path, content=body, headers={**headers, **JSON})


def with_fragment(item: dict[str, Any], fragment: str) -> str:
    """The item's JSON with a raw fragment appended (for values json.dumps cannot produce)."""
    return json.dumps(item)[:-1] + ", " + fragment + "}"


# ------------------------------------------------------------------------------ size and depth


def test_declared_oversize_body_is_413_before_reading_it(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    settings: Settings, stored_counts: Counts,
) -> None:
    body = json.dumps(trace_body("big", policy_name, "x" * settings.max_body_bytes)).encode()
    r = raw_post(client, "/v1/traces", body, admin_headers)
    assert assert_problem(r, 413)["type"].endswith("/payload-too-large")
    assert stored_counts(tenant) == (0, 0)


def test_streamed_oversize_body_without_length_is_413(
    client: TestClient, admin_headers: dict[str, str], settings: Settings, tenant: str,
    stored_counts: Counts,
) -> None:
    chunk = b" " * 65_536

    def chunks() -> Iterator[bytes]:
        # Chunked transfer: no Content-Length to refuse early, the limit must hold while streaming.
        yield b'{"traces": ['
        for _ in range(settings.max_body_bytes // len(chunk) + 2):
            yield chunk
        yield b"]}"

    r = client.post("/v1/traces", content=chunks(), headers={**admin_headers, **JSON})
    assert_problem(r, 413)
    assert stored_counts(tenant) == (0, 0)


def test_deeply_nested_json_is_400(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    for depth in (33, 10_000, 200_000):
        nested = "[" * depth + "]" * depth
        body = with_fragment(trace_body("deep", policy_name), f'"metadata": {{"k": {nested}}}')
        for path in ("/v1/traces", "/v1/feedback"):
            r = raw_post(client, path, body.encode(), admin_headers)
            assert assert_problem(r, 400)["type"].endswith("/json-too-deep"), depth
    assert stored_counts(tenant) == (0, 0)


def test_brackets_inside_strings_do_not_count_as_depth(
    client: TestClient, admin_headers: dict[str, str], policy_name: str
) -> None:
    content = "[" * 500 + "{" * 500 + '\\"[[['
    r = client.post("/v1/traces", json=trace_body("brackets", policy_name, content),
                    headers=admin_headers)
    assert r.status_code == 201, r.text


def test_huge_single_message_is_422_and_batch_keeps_the_rest(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, settings: Settings,
    tenant: str, stored_counts: Counts,
) -> None:
    huge = "y" * (settings.max_message_chars + 1)
    r = client.post("/v1/traces", json=trace_body("huge", policy_name, huge), headers=admin_headers)
    assert_problem(r, 422)
    assert stored_counts(tenant) == (0, 0)
    batch = {"traces": [trace_body("huge", policy_name, huge), trace_body("ok", policy_name)]}
    r = client.post("/v1/traces", json=batch, headers=admin_headers)
    assert r.status_code == 207
    assert [i["status"] for i in r.json()["results"]] == ["invalid", "created"]
    assert stored_counts(tenant) == (1, 0)


def test_oversize_metadata_is_an_invalid_item(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, settings: Settings,
    tenant: str, stored_counts: Counts,
) -> None:
    meta = {"blob": "z" * (settings.max_metadata_bytes + 1)}
    r = client.post("/v1/traces", json=trace_body("m", policy_name, metadata=meta),
                    headers=admin_headers)
    assert "metadata" in assert_problem(r, 422)["detail"]
    assert stored_counts(tenant) == (0, 0)


# ------------------------------------------------------------------------------ encoding

UNPARSABLE: dict[str, bytes] = {
    "garbage": b"\xff\xfe\xfd",
    "bad-byte": b'{"external_id": "a\xff", "policy": "POLICY"}',
    "bad-pair": b'{"traces": [{"external_id": "\xc3\x28"}]}',
    "surrogate-bytes-batch": b'{"traces": [{"external_id": "ok", "policy": "POLICY", '
    b'"response": "r", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}]}',
    "surrogate-bytes": b'{"external_id": "ok", "policy": "POLICY", "response": "\xed\xb2\x80", '
    b'"messages": [{"role": "user", "content": "c"}]}',
    "lone-surrogate-escape": b'{"external_id": "s", "policy": "POLICY", "response": "r", '
    b'"messages": [{"role": "user", "content": "\\ud800"}]}',
    "overlong-encoding": b'{"external_id": "\xc0\xaf", "policy": "POLICY"}',
    "bom": b"\xef\xbb\xbf{}",
    "empty": b"",
    "not-json": b"not json at all",
    "truncated": b'{"traces": [',
    "trailing-garbage": b'{"traces": []} trailing',
}


def test_invalid_utf8_and_unparsable_bodies_are_4xx(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    for case, template in UNPARSABLE.items():
        body = template.replace(b"POLICY", policy_name.encode())
        for path in ("/v1/traces", "/v1/feedback"):
            r = raw_post(client, path, body, admin_headers)
            if r.status_code == 207:
                # A batch may refuse the poisoned item alone; it is not stored either way.
                assert {i["status"] for i in r.json()["results"]} == {"invalid"}, (case, r.text)
            else:
                assert r.status_code < 500, (case, path, r.status_code, r.text)
                assert_problem(r)
    assert stored_counts(tenant) == (0, 0)


NUL_FRAGMENTS = [
    '"metadata": {"k": "a\\u0000b"}',
    '"metadata": {"a\\u0000": 1}',
    '"metadata": {"deep": [{"x": ["\\u0000"]}]}',
    '"model": "m\\u0000"',
    '"outcome": {"name": "n", "value": "v\\u0000"}',
    '"outcome": {"name": "n\\u0000", "value": 1}',
]


def test_nul_characters_are_refused_everywhere(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    for fragment in NUL_FRAGMENTS:
        single = with_fragment(trace_body("nul", policy_name), fragment)
        r = raw_post(client, "/v1/traces", single.encode(), admin_headers)
        assert assert_problem(r, 422)["type"].endswith("/nul-character"), fragment
        # In a batch the poisoned item alone is refused; the others are stored.
        batch = '{"traces": [' + json.dumps(trace_body("fine", policy_name)) + ", " + single + "]}"
        r = raw_post(client, "/v1/traces", batch.encode(), admin_headers)
        assert [x["status"] for x in r.json()["results"]] == [
            "duplicate" if fragment != NUL_FRAGMENTS[0] else "created", "invalid"], fragment
        assert r.json()["results"][1]["error"]["type"].endswith("/nul-character")
    for field in ("Patient note", "Reasoning... ANSWER: YES", policy_name):
        body = json.dumps(trace_body("nul", policy_name)).replace(field, field + "\\u0000")
        assert_problem(raw_post(client, "/v1/traces", body.encode(), admin_headers), 422)
    feedback = b'{"outcomes": [{"trace_external_id": "e\\u0000", "name": "n", "value": 1}]}'
    r = raw_post(client, "/v1/feedback", feedback, admin_headers)
    assert [x["status"] for x in r.json()["results"]] == ["invalid"]
    assert stored_counts(tenant) == (1, 0)


def test_escaped_backslash_before_u0000_is_plain_text(
    client: TestClient, admin_headers: dict[str, str], policy_name: str
) -> None:
    # In JSON, "\\u0000" is a backslash followed by the five characters u0000, not a NUL.
    r = client.post("/v1/traces", json=trace_body("bs", policy_name, "C:\\u0000\\x"),
                    headers=admin_headers)
    assert r.status_code == 201, r.text
    stored = client.get(f"/v1/traces/{r.json()['id']}", headers=admin_headers).json()
    assert stored["messages"][0]["content"] == "C:\\u0000\\x"


def test_nul_in_url_is_refused(client: TestClient, admin_headers: dict[str, str]) -> None:
    assert_problem(client.get("/v1/traces?policy=a%00b", headers=admin_headers), 422)
    assert_problem(client.get("/v1/policies/a%00b", headers=admin_headers), 422)
    assert_problem(client.get("/v1/traces?cursor=%00", headers=admin_headers), 422)


NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1.5E+999", "1" + "0" * 400 + ".5"]


def test_non_finite_numbers_are_400(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    for value in NON_FINITE:
        for fragment in (f'"metadata": {{"k": {value}}}',
                         f'"outcome": {{"name": "n", "value": {value}}}'):
            body = with_fragment(trace_body("nan", policy_name), fragment).encode()
            r = raw_post(client, "/v1/traces", body, admin_headers)
            assert assert_problem(r, 400)["type"].endswith("/non-finite-number"), value
        fb = f'{{"outcomes": [{{"trace_external_id": "nan", "name": "n", "value": {value}}}]}}'
        assert_problem(raw_post(client, "/v1/feedback", fb.encode(), admin_headers), 400)
    assert stored_counts(tenant) == (0, 0)


def test_numbers_that_look_big_inside_strings_are_fine(
    client: TestClient, admin_headers: dict[str, str], policy_name: str
) -> None:
    body = trace_body("s", policy_name, "values NaN Infinity 1e400 " + "9" * 400,
                      metadata={"small": 1e-5, "big": 1.5e300, "int": 10**40})
    r = client.post("/v1/traces", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    stored = client.get(f"/v1/traces/{r.json()['id']}", headers=admin_headers).json()
    assert stored["metadata"]["int"] == 10**40


def test_integers_beyond_64_bits_are_4xx(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    cases: list[tuple[str, str, Any]] = [
        ("GET", "/v1/traces/9223372036854775808", None),
        ("DELETE", "/v1/traces/99999999999999999999999999", None),
        ("POST", "/v1/feedback", {"outcomes": [{"trace_id": 10**30, "name": "x", "value": 1}]}),
        # base64 of "id:99999999999999999999999"
        ("GET", "/v1/traces?cursor=aWQ6OTk5OTk5OTk5OTk5OTk5OTk5OTk5OQ", None),
        ("GET", "/v1/traces?limit=99999999999999999999999", None),
    ]
    for method, path, body in cases:
        r = client.request(method, path, json=body, headers=admin_headers)
        assert r.status_code < 500, (method, path, r.text)
        assert_problem(r)


# ------------------------------------------------------------------------------ shapes


WRONG_TYPES: dict[str, dict[str, Any]] = {
    "messages-not-list": {"messages": "hello"},
    "message-not-object": {"messages": ["hello"]},
    "bad-role": {"messages": [{"role": "wizard", "content": "x"}]},
    "content-not-string": {"messages": [{"role": "user", "content": {"text": "x"}}]},
    "no-messages": {"messages": []},
    "too-many-messages": {"messages": [{"role": "user", "content": "x"}] * 257},
    "response-int": {"response": 42},
    "response-null": {"response": None},
    "external-id-int": {"external_id": 7},
    "external-id-empty": {"external_id": ""},
    "external-id-control": {"external_id": "a\nb"},
    "external-id-long": {"external_id": "e" * 257},
    "policy-list": {"policy": ["p"]},
    "policy-empty": {"policy": ""},
    "metadata-list": {"metadata": [1, 2]},
    "metadata-string": {"metadata": "x"},
    "outcome-value-object": {"outcome": {"name": "n", "value": {"a": 1}}},
    "outcome-value-null": {"outcome": {"name": "n", "value": None}},
    "outcome-value-long": {"outcome": {"name": "n", "value": "v" * 257}},
    "outcome-bad-source": {"outcome": {"name": "n", "value": 1, "source": "guess"}},
    "occurred-at-garbage": {"occurred_at": "yesterday-ish"},
    "model-object": {"model": {"name": "m"}},
    "unknown-field": {"surprise": True},
    "unknown-field-in-message": {"messages": [{"role": "user", "content": "x", "extra": 1}]},
    "unknown-field-in-outcome": {"outcome": {"name": "n", "value": 1, "why": "x"}},
    "unknown-policy": {"policy": "no-such-policy"},
}


def test_wrong_types_and_unknown_fields_are_422_single_and_per_item_in_batches(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    for case, change in WRONG_TYPES.items():
        bad = {**trace_body(f"wt-{case}", policy_name), **change}
        body = assert_problem(client.post("/v1/traces", json=bad, headers=admin_headers), 422)
        assert body["type"].endswith("/invalid-input"), case
        batch = {"traces": [bad, trace_body(f"ok-{case}", policy_name)]}
        r = client.post("/v1/traces", json=batch, headers=admin_headers)
        assert r.status_code == 207, (case, r.text)
        first, second = r.json()["results"]
        assert first["status"] == "invalid" and first["error"]["status"] == 422, case
        assert second["status"] == "created", case
    # Exactly the good halves of the batches were stored.
    assert stored_counts(tenant) == (len(WRONG_TYPES), 0)


MALFORMED_TRACE_BATCHES: list[Any] = [
    {"traces": []}, {"traces": {}}, {"traces": "x"}, {"traces": [], "extra": 1},
    {"traces": [{}], "more": []}, [], {}, None, "traces", 42, [{"traces": []}],
]


def test_empty_or_malformed_trace_batches_are_422(
    client: TestClient, admin_headers: dict[str, str], tenant: str, stored_counts: Counts,
) -> None:
    for body in MALFORMED_TRACE_BATCHES:
        r = raw_post(client, "/v1/traces", json.dumps(body).encode(), admin_headers)
        assert r.status_code == 422, (body, r.text)
        assert_problem(r)
    assert stored_counts(tenant) == (0, 0)


MALFORMED_FEEDBACK: list[Any] = [
    {"outcomes": []}, {}, {"outcomes": [], "extra": 1}, {"outcomes": "x"}, [],
    {"outcomes": ["not-an-object"]}, {"outcomes": None},
]


def test_empty_or_malformed_feedback_batches_are_422(
    client: TestClient, admin_headers: dict[str, str], tenant: str, stored_counts: Counts,
) -> None:
    for body in MALFORMED_FEEDBACK:
        r = client.post("/v1/feedback", json=body, headers=admin_headers)
        assert r.status_code == 422, (body, r.text)
        assert_problem(r)
    assert stored_counts(tenant) == (0, 0)


INVALID_FEEDBACK_ITEMS: list[dict[str, Any]] = [
    {"name": "n", "value": 1},
    {"trace_external_id": "a", "trace_id": 1, "name": "n", "value": 1},
    {"trace_external_id": "a", "name": "", "value": 1},
    {"trace_external_id": "a", "name": "n", "value": [1]},
    {"trace_external_id": "a", "name": "n", "value": None},
    {"trace_external_id": "a", "name": "n", "value": 1, "source": "rumour"},
    {"trace_external_id": "a", "name": "n", "value": 1, "unknown": 1},
    {"trace_external_id": "", "name": "n", "value": 1},
    {"trace_id": 0, "name": "n", "value": 1},
    {"trace_id": 1.5, "name": "n", "value": 1},
]


def test_invalid_feedback_items_are_reported_and_not_stored(
    client: TestClient, admin_headers: dict[str, str], tenant: str, stored_counts: Counts,
) -> None:
    ok = {"trace_external_id": "later", "name": "n", "value": True}
    for item in INVALID_FEEDBACK_ITEMS:
        r = client.post("/v1/feedback", json={"outcomes": [item, ok]}, headers=admin_headers)
        assert r.status_code == 207, (item, r.text)
        first, second = r.json()["results"]
        assert first["status"] == "invalid" and first["error"]["status"] == 422, item
        assert second["status"] == "pending_trace", item
    assert stored_counts(tenant) == (0, 1)


def test_feedback_over_item_limit_is_413(
    client: TestClient, admin_headers: dict[str, str], settings: Settings, tenant: str,
    stored_counts: Counts,
) -> None:
    items = [{"trace_external_id": f"e{i}", "name": "n", "value": i}
             for i in range(settings.max_batch_items + 1)]
    assert_problem(client.post("/v1/feedback", json={"outcomes": items}, headers=admin_headers), 413)
    assert stored_counts(tenant) == (0, 0)


def test_non_json_content_types_are_4xx(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    body = json.dumps(trace_body("ct", policy_name)).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "application/xml", ""):
        r = client.post("/v1/traces", content=body,
                        headers={**admin_headers, "content-type": content_type})
        assert r.status_code < 500, (content_type, r.text)
        assert_problem(r)
    assert stored_counts(tenant) == (0, 0)


# ------------------------------------------------------------------------------ duplicates


def test_ten_thousand_duplicates_in_one_batch_store_one_row(
    roomy_client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    one = trace_body("same", policy_name, outcome={"name": "ok", "value": True})
    r = roomy_client.post("/v1/traces", json={"traces": [one] * 10_000}, headers=admin_headers)
    assert r.status_code == 207, r.text[:300]
    assert r.json()["counts"] == {"created": 1, "duplicate": 9_999, "conflict": 0, "invalid": 0}
    assert len({item["id"] for item in r.json()["results"]}) == 1
    assert stored_counts(tenant) == (1, 1)


def test_ten_thousand_conflicting_reuses_of_one_external_id_store_the_first(
    roomy_client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    stored_counts: Counts,
) -> None:
    batch = [trace_body("same", policy_name, f"variant {i}") for i in range(10_000)]
    r = roomy_client.post("/v1/traces", json={"traces": batch}, headers=admin_headers)
    assert r.status_code == 207
    assert r.json()["counts"] == {"created": 1, "duplicate": 0, "conflict": 9_999, "invalid": 0}
    assert stored_counts(tenant) == (1, 0)
    stored = roomy_client.get("/v1/traces", headers=admin_headers).json()["items"]
    assert stored[0]["messages"][0]["content"] == "variant 0"
