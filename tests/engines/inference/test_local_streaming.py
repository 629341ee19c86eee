"""The local engine streams tokens as it samples them: the same answer as in one piece, the first
chunk before the rest exists, never half a character, and closing the stream ends generation."""

from __future__ import annotations

import threading

import pytest

from workers.inference.base import SamplingParams
from workers.inference.detokenizer import IncrementalDecoder
from workers.inference.serving import LocalServingEngine

PROMPT = [{"role": "user", "content": "ECOG 0, EGFR positive. PFS > 180 d?"}]
# Byte-level BPE spreads each of these over several tokens: halves decode to U+FFFD.
MULTI_BYTE = "Café – naïve 日本 ✓ ok"


def test_deltas_join_to_one_decode_and_never_hold_half_a_character(local_engine):
    tokenizer = local_engine.backend.tokenizer
    ids = tokenizer(MULTI_BYTE, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(MULTI_BYTE.split())  # split characters are really exercised
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.add(i) for i in ids]
    assert "".join(deltas) + decoder.flush(cut=False) == tokenizer.decode(ids) == MULTI_BYTE
    assert not any("\ufffd" in d for d in deltas)


def test_a_cut_inside_a_character_drops_the_dangling_half_only_when_cut(local_engine):
    tokenizer = local_engine.backend.tokenizer
    ids = tokenizer("日", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    cut = IncrementalDecoder(tokenizer)
    assert [cut.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert cut.flush(cut=True) == ""
    ended = IncrementalDecoder(tokenizer)
    for i in ids[:-1]:
        ended.add(i)
    assert ended.flush(cut=False).endswith("\ufffd")  # what the model generated, kept


@pytest.mark.parametrize(("max_tokens", "finish"), [(200, "stop"), (5, "length")])
def test_streamed_answer_equals_the_whole_answer(
    local_engine: LocalServingEngine, max_tokens: int, finish: str
):
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=11)
    whole = local_engine.complete(None, PROMPT, params)
    chunks = list(local_engine.stream(None, PROMPT, params))
    assert whole.finish_reason == chunks[-1].finish_reason == finish
    assert "".join(c.text for c in chunks) == whole.text
    # A chunk per token; the end-of-sequence token is the "stop" chunk, while a cut answer gets
    # a closing "length" chunk that adds no token (it carries only what the decoder held back).
    counts = list(range(1, whole.completion_tokens + 1))
    assert [c.completion_tokens for c in chunks] == (counts if finish == "stop" else
                                                     [*counts, whole.completion_tokens])
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert {c.prompt_tokens for c in chunks} == {whole.prompt_tokens}


def test_the_first_chunk_comes_after_one_token_and_closing_ends_generation(local_engine):
    stream = local_engine.stream(None, PROMPT, SamplingParams(max_tokens=200, temperature=1.0,
                                                              seed=3))
    first = next(stream)
    assert (first.completion_tokens, first.finish_reason) == (1, None)
    stream.close()  # type: ignore[attr-defined]
    # The engine's lock is free again: another thread can generate.
    took: list[bool] = []

    def take() -> None:
        took.append(local_engine.lock.acquire(timeout=5))
        if took[-1]:
            local_engine.lock.release()  # the engine is shared by the session's other tests

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    assert took == [True]
