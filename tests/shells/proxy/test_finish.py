"""How the proxy finishes an engine's text: stop strings and cuts at max_tokens."""

from __future__ import annotations

from app.proxy.service import finish
from workers.inference.serving import EngineCompletion


def completion(text: str, reason: str) -> EngineCompletion:
    return EngineCompletion(text=text, finish_reason=reason, prompt_tokens=3, completion_tokens=5)


def test_text_before_the_earliest_stop_string_is_kept_and_the_reason_is_stop():
    assert finish(completion("YES. Because\n\nmore", "length"), ("\n\n", ".")) == ("YES", "stop")


def test_a_cut_at_max_tokens_drops_the_dangling_partial_character():
    # "é" split by the token cut decodes to U+FFFD; OpenAI never returns half a character.
    assert finish(completion("caf\ufffd", "length"), ()) == ("caf", "length")


def test_a_replacement_character_in_a_finished_answer_is_left_alone():
    assert finish(completion("odd \ufffd", "stop"), ()) == ("odd \ufffd", "stop")


def test_no_stop_string_found_keeps_the_engine_reason():
    assert finish(completion("NO", "stop"), ("ANSWER",)) == ("NO", "stop")
