"""Traces in the OpenAI chat format: what a client sends is what is stored and what GET returns;
media is kept by reference or refused, never dropped; every trace says whether it is trainable."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
        "strict": True,
    },
}


def tool_trace(ext: str, policy: str) -> dict[str, Any]:
    return {
        "external_id": ext,
        "policy": policy,
        "messages": [
            {"role": "developer", "content": "Answer with the weather tool."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18}"},
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "sampling_params": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 64,
                            "stop": ["\n\n"], "seed": 7},
        "response": {"role": "assistant", "content": "It is 18 °C in Paris.",
                     "tool_calls": [{"id": "call_2", "type": "function",
                                     "function": {"name": "get_weather",
                                                  "arguments": "{\"city\": \"Lyon\"}"}}]},
        "finish_reason": "tool_calls",
        "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52},
        "model": "gpt-4o-mini",
        "tags": ["agent", "weather"],
        "user_id": "u-42",
        "session_id": "s-9",
    }


def sent_part(got: dict[str, Any], sent: dict[str, Any]) -> dict[str, Any]:
    return {k: got[k] for k in sent}


def post(client: TestClient, headers: dict[str, str], body: Any) -> Any:
    return client.post("/v1/traces", json=body, headers=headers)


def test_tool_using_trace_is_returned_exactly_as_sent(client, admin_headers, policy_name):
    body = tool_trace("tools-1", policy_name)
    r = post(client, admin_headers, body)
    assert r.status_code == 201, r.text
    got = client.get(f"/v1/traces/{r.json()['id']}", headers=admin_headers).json()
    assert sent_part(got, body) == body
    assert got["trainable"] is True and got["untrainable_reason"] is None


def test_retry_of_a_tool_using_trace_is_a_duplicate(client, admin_headers, policy_name):
    body = tool_trace("tools-2", policy_name)
    assert post(client, admin_headers, body).status_code == 201
    again = post(client, admin_headers, body)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    changed = body | {"tools": []}
    assert post(client, admin_headers, changed).status_code == 409


def test_plain_string_trace_gets_no_new_fields(client, admin_headers, policy_name):
    body = {"external_id": "plain", "policy": policy_name,
            "messages": [{"role": "user", "content": "hi"}], "response": "hello"}
    got = client.get(f"/v1/traces/{post(client, admin_headers, body).json()['id']}",
                     headers=admin_headers).json()
    assert sent_part(got, body) == body
    assert got["tools"] is None and got["finish_reason"] is None and got["tags"] is None


def test_image_by_url_is_stored_by_reference_and_not_trainable(
    client, admin_headers, policy_name
):
    parts = [{"type": "text", "text": "What is in this picture?"},
             {"type": "image_url", "image_url": {"url": "https://example.org/cat.png",
                                                 "detail": "low"}}]
    body = {"external_id": "img", "policy": policy_name,
            "messages": [{"role": "user", "content": parts}], "response": "A cat."}
    r = post(client, admin_headers, body)
    assert r.status_code == 201, r.text
    got = client.get(f"/v1/traces/{r.json()['id']}", headers=admin_headers).json()
    assert got["messages"][0]["content"] == parts
    assert got["trainable"] is False and got["untrainable_reason"] == "image_content"


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    {"type": "file", "file": {"filename": "a.pdf", "file_data": "JVBERi0="}},
])
def test_inline_media_is_refused_with_a_named_error_and_nothing_stored(
    client, admin_headers, policy_name, part
):
    body = {"external_id": "inline", "policy": policy_name,
            "messages": [{"role": "user", "content": [part]}], "response": "ok"}
    r = post(client, admin_headers, body)
    assert r.status_code == 422
    assert r.json()["type"].endswith("/inline-media-unsupported")
    listed = client.get("/v1/traces", params={"external_id": "inline"}, headers=admin_headers)
    assert listed.json()["items"] == []


@pytest.mark.parametrize("message", [
    {"role": "user", "content": "x", "tool_calls": []},
    {"role": "tool", "content": "18"},
    {"role": "user", "content": "x", "tool_call_id": "call_1"},
    {"role": "user", "content": None},
    {"role": "system", "content": [{"type": "image_url",
                                    "image_url": {"url": "https://example.org/a.png"}}]},
    {"role": "function", "content": "x"},
    {"role": "user", "content": [{"type": "video", "video": "x"}]},
])
def test_messages_that_break_the_chat_format_are_422(client, admin_headers, policy_name, message):
    body = {"external_id": "bad", "policy": policy_name, "messages": [message], "response": "x"}
    r = post(client, admin_headers, body)
    assert r.status_code == 422, r.text
    assert r.json()["type"].endswith("/invalid-input")


def test_content_filtered_response_is_stored_but_not_trainable(
    client, admin_headers, policy_name
):
    body = {"external_id": "cf", "policy": policy_name,
            "messages": [{"role": "user", "content": "x"}], "response": "",
            "finish_reason": "content_filter"}
    got = client.get(f"/v1/traces/{post(client, admin_headers, body).json()['id']}",
                     headers=admin_headers).json()
    assert (got["trainable"], got["untrainable_reason"]) == (False, "content_filtered")


def test_list_filters_by_external_id(client, admin_headers, policy_name):
    for ext in ("a-1", "a-2"):
        post(client, admin_headers, tool_trace(ext, policy_name))
    listed = client.get("/v1/traces", params={"external_id": "a-2"}, headers=admin_headers)
    assert [t["external_id"] for t in listed.json()["items"]] == ["a-2"]


def test_pii_in_text_parts_and_tool_arguments_is_redacted(client, admin_headers, policy_name):
    body = tool_trace("pii", policy_name)
    body["messages"][1]["content"][0]["text"] = "Mail jane@example.org"
    body["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{"ssn": "123-45-6789"}'
    got = client.get(f"/v1/traces/{post(client, admin_headers, body).json()['id']}",
                     headers=admin_headers).json()
    assert got["messages"][1]["content"][0]["text"] == "Mail [EMAIL]"
    assert got["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"ssn": "[SSN]"}'
    assert got["redactions"] == {"EMAIL": 1, "SSN": 1}


# ---------------------------------------------------------------- property: post → get


# Storable text: no lone surrogates and no C0 controls but tab/newline/CR (those are a 422, see
# tests/security/test_hostile_strings.py); everything else must come back exactly as posted.
REFUSED_CONTROLS = "".join(chr(c) for c in range(0x20) if chr(c) not in "\t\n\r")
text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters=REFUSED_CONTROLS),
               max_size=20)
ident = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
tool_call = st.fixed_dictionaries(
    {"id": ident, "function": st.fixed_dictionaries({"name": ident, "arguments": text})},
    optional={"type": st.just("function")},
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
image_part = st.fixed_dictionaries({
    "type": st.just("image_url"),
    "image_url": st.fixed_dictionaries(
        {"url": ident.map(lambda s: f"https://example.org/{s}.png")},
        optional={"detail": st.sampled_from(["auto", "low", "high"])}),
})
user = st.fixed_dictionaries(
    {"role": st.just("user"), "content": text | st.lists(text_part | image_part, max_size=3)},
    optional={"name": ident},
)
system = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer"]),
     "content": text | st.lists(text_part, max_size=2)})
assistant = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": st.none(),
     "tool_calls": st.lists(tool_call, min_size=1, max_size=2)},
) | st.fixed_dictionaries({"role": st.just("assistant"), "content": text},
                          optional={"refusal": text})
tool = st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": ident, "content": text})
tool_def = st.fixed_dictionaries({
    "type": st.just("function"),
    "function": st.fixed_dictionaries(
        {"name": ident},
        optional={"description": text, "strict": st.booleans(),
                  "parameters": st.just({"type": "object", "properties": {}})}),
})
sampling = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
    "max_tokens": st.integers(1, 4096), "stop": text | st.lists(text, max_size=4),
    "seed": st.integers(0, 2**62), "n": st.integers(1, 4), "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
})
response = text | st.fixed_dictionaries(
    {"content": text}, optional={"role": st.just("assistant"),
                                 "tool_calls": st.lists(tool_call, max_size=2)},
) | st.fixed_dictionaries({"content": st.none(),
                           "tool_calls": st.lists(tool_call, min_size=1, max_size=2)})
optional_fields = {
    "tools": st.lists(tool_def, max_size=3),
    "tool_choice": st.sampled_from(["auto", "none", "required"])
    | st.just({"type": "function", "function": {"name": "f"}}),
    "parallel_tool_calls": st.booleans(),
    "sampling_params": sampling,
    "finish_reason": st.sampled_from(["stop", "length", "tool_calls"]),
    "usage": st.fixed_dictionaries({"prompt_tokens": st.integers(0, 10**6),
                                    "completion_tokens": st.integers(0, 10**6),
                                    "total_tokens": st.integers(0, 10**6)}),
    "model": ident,
    "tags": st.lists(ident, max_size=4),
    "user_id": ident,
    "session_id": ident,
    "metadata": st.dictionaries(ident, text | st.integers(-10**9, 10**9), max_size=3),
}


def chat_traces(policy: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"external_id": st.just("replaced-per-example"), "policy": st.just(policy),
         "messages": st.lists(system | user | assistant | tool, min_size=1, max_size=5),
         "response": response},
        optional=optional_fields,
    )


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


def test_any_chat_trace_comes_back_from_get_exactly_as_posted(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    policy = f"rt-{uuid.uuid4().hex[:8]}"
    r = client.post("/v1/policies", json={"name": policy, "redaction_enabled": False},
                    headers=admin_headers)
    assert r.status_code == 201, r.text

    @given(body=chat_traces(policy))
    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    def round_trip(body: dict[str, Any]) -> None:
        body["external_id"] = uuid.uuid4().hex  # Hypothesis replays examples: keep each new
        r = post(client, admin_headers, body)
        assert r.status_code == 201, r.text
        got = client.get(f"/v1/traces/{r.json()['id']}", headers=admin_headers).json()
        assert sent_part(got, body) == body

    round_trip()
