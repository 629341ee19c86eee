"""The ingest route reads its own body (orjson where it gives Python's value): what a client
sends is stored as Python's parser reads it, and refused as FastAPI would refuse it."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from app.limits import parse_json

JSON = {"content-type": "application/json"}


def test_integers_beyond_64_bits_are_parsed_exactly_not_as_floats() -> None:
    assert parse_json(b'{"n": 123456789012345678901234567890}') == {
        "n": 123456789012345678901234567890}
    assert parse_json(b'{"n": 9007199254740993}') == {"n": 9007199254740993}


def test_a_lone_surrogate_escape_reaches_the_string_check() -> None:
    assert parse_json(b'{"s": "\\ud800"}') == {"s": "\ud800"}


def test_a_big_integer_in_metadata_is_stored_exactly(
    client: TestClient, admin_headers: dict[str, str], policy_name: str
) -> None:
    big = "123456789012345678901234567890"
    body = json.dumps({"external_id": "big", "policy": policy_name, "response": "a",
                       "messages": [{"role": "user", "content": "q"}],
                       "metadata": {"n": "BIG"}}).replace('"BIG"', big)
    r = client.post("/v1/traces", content=body, headers={**admin_headers, **JSON})
    assert r.status_code == 201, r.text
    stored = client.get(f"/v1/traces/{r.json()['id']}", headers=admin_headers)
    assert json.loads(stored.content)["metadata"] == {"n": 123456789012345678901234567890}


def test_a_body_that_is_not_json_is_422_and_a_list_is_422(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    for body in (b'{"external_id": ', b"[]", b'"x"'):
        r = client.post("/v1/traces", content=body, headers={**admin_headers, **JSON})
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")


def test_an_invalid_single_trace_names_the_field_without_the_body_prefix(
    client: TestClient, admin_headers: dict[str, str], policy_name: str
) -> None:
    r = client.post("/v1/traces", json={"external_id": "x", "policy": policy_name,
                                        "messages": [], "response": "a"}, headers=admin_headers)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"][0] == "messages"
