"""Streaming as it is generated: the official `openai` SDK gets each piece while the rest does
not exist yet, and a stop string ends generation without being sent. The engine is a scripted
one behind the serving interface, so the test can see what was generated when; the API runs for
real (uvicorn, Postgres) in this process."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from app.engines import set_engine_override
from tests.conftest import LiveServer
from tests.support.seeding import ScriptedEngine
from workers.inference.base import SamplingParams
from workers.inference.serving import EngineChunk, LocalServingEngine

MESSAGES: list[Any] = [{"role": "user", "content": "ECOG 0, EGFR positive. PFS > 180 d?"}]


@pytest.fixture
def api_url(live_server: LiveServer) -> str:
    return live_server.url


@pytest.fixture
def engine_slot() -> Iterator[None]:
    yield
    set_engine_override(None)


def install(engine: ScriptedEngine) -> ScriptedEngine:
    set_engine_override(engine)
    return engine


def test_the_first_piece_reaches_the_client_before_the_rest_is_generated(
    sdk, policy, engine_slot
):
    # The engine writes the rest only once the client has the first piece (or gives up after
    # wait_s): a proxy that generated the whole answer before sending would make it give up.
    seen_first = threading.Event()
    engine = install(ScriptedEngine(["YES", ",", " because", " ECOG", " 0."], resume=seen_first,
                                    wait_s=15))
    events: list[str] = []
    for chunk in sdk.chat.completions.create(model=policy, messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            events.append(chunk.choices[0].delta.content)
            seen_first.set()
    assert engine.resumed is True
    assert "".join(events) == "YES, because ECOG 0."


class PacedEngine:
    """The real local engine, which after its first piece of text samples no further token
    until ``resume`` is set (at most ``wait_s``); ``resumed`` says whether it was."""

    def __init__(self, inner: LocalServingEngine, resume: threading.Event,
                 wait_s: float = 15) -> None:
        self.inner, self.resume, self.wait_s = inner, resume, wait_s
        self.resumed: bool | None = None
        self.load_adapter, self.unload_adapter = inner.load_adapter, inner.unload_adapter
        self.list_models, self.complete = inner.list_models, inner.complete

    def stream(self, model: str | None, messages: list[dict[str, str]],
               params: SamplingParams) -> Iterator[EngineChunk]:
        for chunk in self.inner.stream(model, messages, params):
            yield chunk
            if chunk.text and self.resumed is None:
                self.resumed = self.resume.wait(self.wait_s)


def test_the_local_engine_streams_each_token_as_it_is_sampled(sdk, policy, local_engine,
                                                               engine_slot):
    seen_first = threading.Event()
    engine = PacedEngine(local_engine, seen_first)
    set_engine_override(engine)
    pieces: list[str] = []
    usage = None
    for chunk in sdk.chat.completions.create(model=policy, messages=MESSAGES, max_tokens=32,
                                             temperature=1.0, seed=5, stream=True,
                                             stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            seen_first.set()
        usage = chunk.usage or usage
    assert engine.resumed is True
    assert usage is not None and usage.completion_tokens > 1 and len(pieces) > 1
    plain = sdk.chat.completions.create(model=policy, messages=MESSAGES, max_tokens=32,
                                        temperature=1.0, seed=5)
    assert "".join(pieces) == plain.choices[0].message.content


def test_a_stop_string_ends_generation_and_is_never_sent(sdk, http: httpx.Client, policy,
                                                          engine_slot):
    pieces = ["YES", " because", " ST", "OP", " never", " generated", "."]
    engine = install(ScriptedEngine(pieces))
    chunks = list(sdk.chat.completions.create(model=policy, messages=MESSAGES, stop=["STOP"],
                                              stream=True, stream_options={"include_usage":
                                                                           True}))
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(x or "" for x in contents) == "YES because "
    assert not any("ST" in (x or "") for x in contents)  # not even the held beginning
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # Generation ended at the piece that completed the stop string; usage counts what was made.
    assert (engine.generated, engine.closed) == (4, True)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

    plain = sdk.chat.completions.create(model=policy, messages=MESSAGES, stop="STOP")
    assert plain.choices[0].message.content == "YES because "
    assert plain.choices[0].finish_reason == "stop" and engine.generated == 4
    trace = http.get("/v1/traces", params={"external_id": plain.id}).json()["items"][0]
    assert trace["response"] == "YES because " and trace["finish_reason"] == "stop"


def test_max_tokens_ends_the_answer_with_length_in_both_modes(sdk, policy, engine_slot):
    install(ScriptedEngine(["a", "b", "c", "d"]))
    args: Any = {"model": policy, "messages": MESSAGES, "max_tokens": 2}
    plain = sdk.chat.completions.create(**args)
    chunks = list(sdk.chat.completions.create(**args, stream=True))
    assert (plain.choices[0].message.content, plain.choices[0].finish_reason) == ("ab", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ab"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streams_waiting_on_generation_leave_the_server_free_for_other_requests(
    api_url, key, policy, engine_slot
):
    # More streams than the server's worker threads (40), all waiting for their next token:
    # none may hold a worker thread, or the API's other (sync) routes would queue behind them.
    resume = threading.Event()
    install(ScriptedEngine(["first", " rest"], resume=resume, wait_s=60))
    streams = 45

    async def run() -> tuple[int, list[str]]:
        client = openai.AsyncOpenAI(api_key=key, base_url=f"{api_url}/v1", max_retries=0,
                                    timeout=60)

        async def first_piece() -> Any:
            stream = await client.chat.completions.create(model=policy, messages=MESSAGES,
                                                          stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    return stream, chunk.choices[0].delta.content
            raise AssertionError("no content")

        # Well before the engine gives up waiting (60 s): every stream got its first piece.
        opened = await asyncio.wait_for(
            asyncio.gather(*(first_piece() for _ in range(streams))), 20)
        async with httpx.AsyncClient(base_url=api_url, timeout=10,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            status = (await http.get("/v1/models")).status_code
        resume.set()
        texts = []
        for stream, first in opened:
            texts.append(first + "".join([c.choices[0].delta.content or "" async for c in stream
                                          if c.choices]))
        await client.close()
        return status, texts

    status, texts = asyncio.run(run())
    assert status == 200
    assert texts == ["first rest"] * streams


@pytest.mark.parametrize("pieces", [
    ["ECOG", " ", " 1", ":", " YES"],           # a lone space token before a digit
    [" ", "YES", "\n\n", "because\t", "  ", "."],  # leading, trailing and mixed whitespace
])
def test_a_streamed_retry_replays_the_stored_answer_to_the_character(sdk, policy, engine_slot,
                                                                       pieces):
    install(ScriptedEngine(pieces))
    args: Any = {"model": policy, "messages": MESSAGES,
                 "extra_headers": {"X-Tracelearn-External-Id": f"ws-{uuid.uuid4().hex[:8]}"}}
    first = sdk.chat.completions.create(**args).choices[0].message.content
    assert first == "".join(pieces)
    replayed = [c.choices[0].delta.content or "" for c in
                sdk.chat.completions.create(**args, stream=True) if c.choices]
    assert "".join(replayed) == first
    assert sum(1 for p in replayed if p) > 1  # replayed in pieces, not as one block
