"""Tool calls the model writes come back to the official `openai` SDK as `tool_calls` (sync,
async, streamed), and are stored with the trace. The tiny model never writes a call, so the
engine here is a scripted one behind the same serving interface; the API runs for real
(uvicorn, Postgres) in this process."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from app.engines import set_engine_override
from tests.conftest import LiveServer
from tests.support.live_api import stored_trace as stored
from tests.support.seeding import ScriptedEngine
from workers.graders import get_grader
from workers.inference.tool_calls import ParsedCall

MESSAGES: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}
# What tools_block asks a model without tools support for, written in three tokens.
JSON_CALL = ['[{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}]']
# A tool-trained template's call (Hermes), after a sentence.
HERMES_CALL = ["Let me ", "check.", "\n<tool_call>\n", '{"name": "get_weather", ',
               '"arguments": {"city": "Paris"}}', "\n</tool_call>"]


@pytest.fixture
def api_url(live_server: LiveServer) -> str:
    return live_server.url


@pytest.fixture
def script() -> Iterator[Callable[[list[str]], ScriptedEngine]]:
    def install(pieces: list[str]) -> ScriptedEngine:
        engine = ScriptedEngine(pieces)
        set_engine_override(engine)
        return engine

    yield install
    set_engine_override(None)


def test_a_call_comes_back_as_tool_calls_and_is_stored_gradeable(sdk, http, policy, script):
    script(JSON_CALL)
    out = sdk.chat.completions.create(model=policy, messages=MESSAGES, tools=[WEATHER_TOOL])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')

    trace = stored(http, out.id)
    assert trace["finish_reason"] == "tool_calls"
    assert trace["response"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    grade = get_grader({"kind": "tool_call"}).grade(
        [], json.dumps(trace["response"]),
        {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}})
    assert (grade.reward, grade.detail) == (1.0, "correct")


def test_text_before_a_hermes_call_is_the_content(sdk, http, policy, script):
    script(HERMES_CALL)
    out = sdk.chat.completions.create(model=policy, messages=MESSAGES, tools=[WEATHER_TOOL])
    message = out.choices[0].message
    assert message.content == "Let me check."
    assert [c.function.name for c in message.tool_calls or []] == ["get_weather"]
    assert stored(http, out.id)["response"]["content"] == "Let me check."


def test_a_streamed_call_arrives_as_tool_call_deltas_after_the_text(sdk, policy, script):
    script(HERMES_CALL)
    chunks = list(sdk.chat.completions.create(model=policy, messages=MESSAGES,
                                              tools=[WEATHER_TOOL], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls" and set(finishes[:-1]) == {None}
    # No piece of the call leaked out as text while it was being written.
    assert not any("<tool" in (d.content or "") for d in deltas)


def test_the_sdks_stream_helper_assembles_the_same_message(sdk, policy, script):
    script(JSON_CALL)
    with sdk.chat.completions.stream(model=policy, messages=MESSAGES,
                                     tools=[WEATHER_TOOL]) as events:
        final = events.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Paris"})


def test_the_async_client_gets_tool_calls_plain_and_streamed(api_url, key, policy, script):
    script(JSON_CALL)

    async def run() -> tuple[Any, list[Any]]:
        client = openai.AsyncOpenAI(api_key=key, base_url=f"{api_url}/v1", max_retries=0)
        plain = await client.chat.completions.create(model=policy, messages=MESSAGES,
                                                     tools=[WEATHER_TOOL])
        streamed = [c async for c in await client.chat.completions.create(
            model=policy, messages=MESSAGES, tools=[WEATHER_TOOL], stream=True)]
        await client.close()
        return plain, streamed

    plain, streamed = asyncio.run(run())
    assert [c.function.name for c in plain.choices[0].message.tool_calls] == ["get_weather"]
    calls = [t for c in streamed if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [c.function.arguments for c in calls] == ['{"city": "Paris"}']
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_the_answer_as_text(sdk, http, policy, script):
    script(JSON_CALL)
    out = sdk.chat.completions.create(model=policy, messages=MESSAGES, tools=[WEATHER_TOOL],
                                      tool_choice="none")
    choice = out.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content == "".join(JSON_CALL)
    assert stored(http, out.id)["response"] == "".join(JSON_CALL)


def test_a_malformed_call_stays_text(sdk, policy, script):
    broken = ['<tool_call>{"name": "get_weather", ', '"arguments": {city: Paris}}</tool_call>']
    script(broken)
    out = sdk.chat.completions.create(model=policy, messages=MESSAGES, tools=[WEATHER_TOOL])
    assert out.choices[0].message.content == "".join(broken)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
    chunks = list(sdk.chat.completions.create(model=policy, messages=MESSAGES,
                                              tools=[WEATHER_TOOL], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "".join(broken)


def test_a_retry_replays_the_same_tool_calls_streamed_or_not(sdk, policy, script):
    engine = script(JSON_CALL)
    headers = {"X-Tracelearn-External-Id": f"req-{uuid.uuid4().hex[:8]}"}
    args: Any = {"model": policy, "messages": MESSAGES, "tools": [WEATHER_TOOL],
                 "extra_headers": headers}
    first = sdk.chat.completions.create(**args)
    again = sdk.chat.completions.create(**args)
    streamed = [t for c in sdk.chat.completions.create(**args, stream=True) if c.choices
                for t in c.choices[0].delta.tool_calls or []]
    assert engine.calls == 1
    assert again.choices[0].message.tool_calls == first.choices[0].message.tool_calls
    assert again.choices[0].finish_reason == "tool_calls"
    assert [(t.id, t.function.arguments) for t in streamed] == [
        (c.id, c.function.arguments) for c in first.choices[0].message.tool_calls or []]


def test_calls_the_engine_split_off_itself_come_back_as_tool_calls(sdk, policy):
    # A vLLM server with a tool-call parser: the text holds no call, the last chunk brings it.
    engine = ScriptedEngine(["Checking."], tool_calls=[ParsedCall("get_weather",
                                                                  '{"city": "Paris"}')])
    set_engine_override(engine)
    try:
        out = sdk.chat.completions.create(model=policy, messages=MESSAGES, tools=[WEATHER_TOOL],
                                          tool_choice="required")
        prompt = engine.messages
        chunks = list(sdk.chat.completions.create(model=policy, messages=MESSAGES,
                                                  tools=[WEATHER_TOOL], stream=True))
    finally:
        set_engine_override(None)
    message = out.choices[0].message
    assert message.content == "Checking." and out.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("get_weather", '{"city": "Paris"}')]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The client's tool_choice reached the engine with the tools (for the server to honour).
    assert prompt[0] == {"role": "tools", "tools": [WEATHER_TOOL], "tool_choice": "required"}
