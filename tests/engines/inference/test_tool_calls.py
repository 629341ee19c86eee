"""Tool calls split off a generated answer as OpenAI returns them, and the streaming gate that
holds back what may become a call: hand-written answers, hand-computed messages."""

from __future__ import annotations

import pytest

from workers.inference.tool_calls import ParsedAnswer, ParsedCall, ToolCallGate, split_tool_calls

TOOLS = frozenset({"get_weather", "lookup_ecog"})
PARIS = ParsedCall("get_weather", '{"city": "Paris"}')


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # What tools_block asks a model without tools support for: a JSON list of calls.
        ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', ParsedAnswer(None, (PARIS,))),
        # One call on its own, with whitespace around it and non-ASCII arguments kept as such.
        (' \n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n',
         ParsedAnswer(None, (ParsedCall("get_weather", '{"city": "Zürich"}'),))),
        # OpenAI's shape in a fence; arguments already JSON text are kept verbatim.
        ('```json\n{"type": "function", "function": {"name": "lookup_ecog", '
         '"arguments": "{\\"id\\":7}"}}\n```',
         ParsedAnswer(None, (ParsedCall("lookup_ecog", '{"id":7}'),))),
        # Hermes blocks: the text before them is the content; no arguments is an empty object.
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
         '</tool_call>\n<tool_call>{"name": "lookup_ecog"}</tool_call>',
         ParsedAnswer("Let me check.", (PARIS, ParsedCall("lookup_ecog", "{}")))),
        # A last block the model ended without its closing tag.
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',
         ParsedAnswer(None, (PARIS,))),
        # Text after a call is content too.
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
         'Then I answer.', ParsedAnswer("\nThen I answer.", (PARIS,))),
    ],
)
def test_calls_in_the_shapes_models_write_are_split_off(text, expected):
    assert split_tool_calls(text, TOOLS) == expected


@pytest.mark.parametrize(
    "text",
    [
        "YES. PFS over 180 days.",  # plain text
        '{"answer": "YES"}',  # JSON that is no call
        '[{"name": "get_weather", "arguments": {"city": "Paris"}',  # cut: not JSON
        '<tool_call>{"name": "get_weather", "arguments": {city: Paris}}</tool_call>',  # bad JSON
        '<tool_call>{"name": "get_weather"}</tool_call><tool_call>{"nam</tool_call>',  # one bad
        '[{"name": "delete_everything", "arguments": {}}]',  # not an offered tool
        '[{"name": "get_weather", "arguments": ["Paris"]}]',  # arguments not an object
        '[{"name": "get_weather", "arguments": "Paris"}]',  # arguments text that is no JSON
        "[]",
        'Example: {"name": "get_weather", "arguments": {}} is how I would call it.',  # prose
    ],
)
def test_anything_else_stays_text_unchanged(text):
    assert split_tool_calls(text, TOOLS) == ParsedAnswer(text)


def test_without_offered_tools_nothing_is_a_call():
    text = '[{"name": "get_weather", "arguments": {}}]'
    assert split_tool_calls(text, frozenset()) == ParsedAnswer(text)


def _streamed(pieces: list[str]) -> tuple[list[str], str, tuple[ParsedCall, ...]]:
    gate = ToolCallGate(TOOLS)
    sent = [gate.feed(p) for p in pieces]
    rest, calls = gate.finish()
    return sent, rest, calls


def test_text_before_a_call_streams_and_the_call_is_held_whole():
    sent, rest, calls = _streamed(["Let me ", "check.\n", "<tool", '_call>{"name": "get_weather",',
                                   ' "arguments": {"city": "Paris"}}', "</tool_call>"])
    # The newline is held (content drops trailing whitespace before a call), so is "<tool".
    assert sent == ["Let me", " check.", "", "", "", ""]
    assert (rest, calls) == ("", (PARIS,))


def test_an_answer_that_starts_like_a_call_is_held_until_complete():
    sent, rest, calls = _streamed(['[{"name": "get_', 'weather", "arguments": ',
                                   '{"city": "Paris"}}]'])
    assert sent == ["", "", ""] and (rest, calls) == ("", (PARIS,))


def test_a_held_answer_that_is_no_call_is_sent_whole_at_the_end():
    sent, rest, calls = _streamed(["  ", '{"answer": ', '"YES"}'])
    assert sent == ["", "", ""] and (rest, calls) == ('  {"answer": "YES"}', ())


def test_plain_text_streams_as_it_comes_and_a_false_start_of_a_tag_is_released():
    sent, rest, calls = _streamed(["\nYES", " <", "b>"])
    assert sent == ["\nYES", "", " <b>"] and (rest, calls) == ("", ())


@pytest.mark.parametrize(
    "text",
    ["Let me check.\n<tool_call>{\"name\": \"get_weather\"}</tool_call>\nDone.",
     ' [{"name": "lookup_ecog", "arguments": {"id": 7}}]',
     "<tool_call>{\"name\": \"nope\"}</tool_call>", "plain\n\n answer  ", ""],
)
def test_streamed_one_character_at_a_time_the_client_gets_the_parsed_message(text):
    sent, rest, calls = _streamed(list(text))
    parsed = split_tool_calls(text, TOOLS)
    assert "".join(sent) + rest == (parsed.content or "") and calls == parsed.calls
