"""The string check's fast path (judged on the orjson encoding) agrees with the walk it skips:
every refused string and key is still found, wherever and however it is escaped."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.traces.strings import MAX_KEY_CHARS, _walk, string_problems

_PIECES = ["a", "é", "\"", "\\", "\\\\", "\\\"", "\n", "\t", "\x00", "\x08", "\x0c", "\x1f",
           "\ud800", "\udfff", "\U0001f600", "b", "f", "u0000", ":", "\":"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=8).map("".join)
# Keys near the limit, with quotes and backslashes (escaped in JSON) in them.
_KEY = _TEXT | st.builds(lambda head, n, tail: head + "k" * n + tail, _TEXT,
                         st.integers(MAX_KEY_CHARS - 8, MAX_KEY_CHARS + 2), _TEXT)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEY, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(_JSON, st.booleans())
def test_the_fast_path_finds_what_the_walk_finds(value: Any, allow_controls: bool) -> None:
    assert string_problems(value, allow_controls=allow_controls) == list(
        _walk(value, (), allow_controls))


def test_a_long_key_behind_escaped_backslashes_and_quotes_is_found() -> None:
    for tail in ("\\", "\"", "\\\"", "\"\\"):
        key = "k" * MAX_KEY_CHARS + tail
        assert string_problems({"a": {key: 1}})[0]["type"] == "string_too_long"
        assert string_problems({key[len(tail):]: 1}) == []  # at the limit
