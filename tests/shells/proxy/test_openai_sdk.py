"""The proxy as the official `openai` SDK sees it, against a real `tracelearn api` process:
what it supports behaves as OpenAI's does, what it does not is refused with OpenAI's error
classes, and every exchange is stored as a trace."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.support.live_api import stored_trace as stored

MESSAGES: list[Any] = [
    {"role": "developer", "content": "Answer YES or NO."},
    {"role": "user", "content": [{"type": "text", "text": "ECOG 0, EGFR positive. PFS > 180 d?"}]},
]
WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


def test_completion_answers_and_is_stored_with_its_sampling_params(sdk, http, policy):
    out = sdk.chat.completions.create(model=policy, messages=MESSAGES, max_tokens=8, seed=1,
                                      temperature=0.5)
    choice = out.choices[0]
    assert out.model == f"{policy}-v0" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    trace = stored(http, out.id)
    assert trace["messages"] == MESSAGES
    assert trace["response"] == choice.message.content
    assert trace["finish_reason"] == choice.finish_reason
    assert trace["sampling_params"] == {"max_tokens": 8, "temperature": 0.5, "seed": 1}
    assert trace["usage"] == out.usage.model_dump(exclude_none=True)
    assert trace["trainable"] is True


def test_a_cut_at_max_tokens_says_length_streaming_or_not(sdk, policy):
    args: Any = {"model": policy, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
    plain = sdk.chat.completions.create(**args)
    chunks = list(sdk.chat.completions.create(**args, stream=True))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert plain.choices[0].finish_reason == "length"
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content


def test_stop_strings_cut_the_answer_before_them(sdk, policy):
    args: Any = {"model": policy, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    full = sdk.chat.completions.create(**args).choices[0].message.content or ""
    if len(full) < 4:
        pytest.skip(f"the tiny model answered too little to cut: {full!r}")
    stop = full[2:4]
    cut = sdk.chat.completions.create(**args, stop=[stop, "never-seen"]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = list(sdk.chat.completions.create(**args, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        full[: full.index(stop)]


def test_stream_with_include_usage_ends_with_a_usage_chunk(sdk, policy):
    chunks = list(sdk.chat.completions.create(
        model=policy, messages=MESSAGES, max_tokens=6, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_async_client_completes_and_streams(api_url, key, policy):
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(api_key=key, base_url=f"{api_url}/v1", max_retries=0)
        one = await client.chat.completions.create(model=policy, messages=MESSAGES,
                                                   max_tokens=6, seed=4, temperature=0)
        parts = [c.choices[0].delta.content or "" async for c in
                 await client.chat.completions.create(model=policy, messages=MESSAGES,
                                                      max_tokens=6, seed=4, temperature=0,
                                                      stream=True) if c.choices]
        await client.close()
        return one.choices[0].message.content or "", "".join(parts)

    plain, streamed = asyncio.run(run())
    assert plain == streamed


def test_models_list_and_retrieve_name_the_policies(sdk, policy):
    ids = [m.id for m in sdk.models.list()]
    assert policy in ids
    model = sdk.models.retrieve(policy)
    assert model.id == policy and model.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        sdk.models.retrieve("no-such-policy")
    assert err.value.code == "model_not_found" and "no-such-policy" in str(err.value)


def test_errors_arrive_as_the_sdk_error_classes_with_their_message(api_url, sdk, policy):
    bad = openai.OpenAI(api_key="tl_nope_nope", base_url=f"{api_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.chat.completions.create(model=policy, messages=MESSAGES)
    assert "Error code: 401" in str(auth.value) and len(auth.value.message) > len("Error code: 401")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}]}]},
         "messages.[0].content"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.[0]"),
    ]
    for extra, param in cases:
        args: Any = {"model": policy, "messages": MESSAGES, "max_tokens": 4} | extra
        with pytest.raises(openai.BadRequestError) as err:
            sdk.chat.completions.create(**args)
        assert err.value.type == "invalid_request_error", extra
        assert str(err.value.param).startswith(param), (extra, err.value.body)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="no-such-policy", messages=MESSAGES)


def test_a_retry_with_the_same_external_id_replays_the_stored_answer(sdk, http, policy):
    headers = {"X-Tracelearn-External-Id": f"req-{uuid.uuid4().hex[:8]}"}
    args: Any = {"model": policy, "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0,
                 "extra_headers": headers}
    first = sdk.chat.completions.create(**args)
    again = sdk.chat.completions.create(**args)
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       sdk.chat.completions.create(**args, stream=True) if c.choices)
    assert first.id == again.id == headers["X-Tracelearn-External-Id"]
    assert again.choices[0].message.content == first.choices[0].message.content == streamed
    assert again.choices[0].finish_reason == first.choices[0].finish_reason
    assert stored(http, first.id)["response"] == first.choices[0].message.content
    with pytest.raises(openai.ConflictError) as err:
        sdk.chat.completions.create(**args | {"messages": [{"role": "user", "content": "other"}]})
    assert err.value.code == "idempotency_key_reused"


def test_a_streamed_first_answer_is_replayed_to_a_retry(sdk, policy):
    headers = {"X-Tracelearn-External-Id": f"req-{uuid.uuid4().hex[:8]}"}
    args: Any = {"model": policy, "messages": MESSAGES, "max_tokens": 12, "extra_headers": headers}
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       sdk.chat.completions.create(**args, stream=True) if c.choices)
    assert sdk.chat.completions.create(**args).choices[0].message.content == streamed


def test_tools_and_tool_history_are_accepted_stored_and_shown_to_the_model(sdk, http, policy):
    messages: Any = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    out = sdk.chat.completions.create(model=policy, messages=messages, tools=[WEATHER_TOOL],
                                      tool_choice="auto", max_tokens=6)
    trace = stored(http, out.id)
    assert trace["tools"] == [WEATHER_TOOL] and trace["tool_choice"] == "auto"
    assert trace["messages"] == messages
    # The definitions reach the model (the bundled template has no tools support: a system block
    # listing them, as regeneration renders them), so the prompt is longer than without them.
    bare = sdk.chat.completions.create(model=policy, messages=messages, max_tokens=6)
    assert out.usage is not None and bare.usage is not None
    assert out.usage.prompt_tokens > bare.usage.prompt_tokens + 20


def test_an_aborted_stream_is_recorded_untrainable_and_counted(api_url, key, http, policy):
    ext = f"abort-{uuid.uuid4().hex[:8]}"
    body = {"model": policy, "messages": MESSAGES, "max_tokens": 64, "stream": True}
    with httpx.Client(base_url=api_url, timeout=60) as client, client.stream(
        "POST", "/v1/chat/completions", json=body,
        headers={"Authorization": f"Bearer {key}", "X-Tracelearn-External-Id": ext},
    ) as r:
        first = next(r.iter_lines())
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    deadline = time.monotonic() + 30
    while not http.get("/v1/traces", params={"external_id": ext}).json()["items"]:
        assert time.monotonic() < deadline, "the aborted stream was not recorded"
        time.sleep(0.2)
    trace = stored(http, ext)
    assert (trace["trainable"], trace["untrainable_reason"]) == (False, "aborted")
    metrics = httpx.get(f"{api_url}/metrics").text
    assert "tracelearn_proxy_streams_aborted_total" in metrics
