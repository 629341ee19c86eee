"""The body guards' fast checks against the plain definitions they replace: the depth check
is a byte-by-byte scan done in C, and the body's marks (``body_marks``: the suspect-number,
long-integer and backslash-quote prechecks) are read in one pass by Vectorscan where ``re``
reads each alone."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from app.limits import BodyMarks, body_marks, json_depth_exceeds


def depth_exceeds_by_scanning(body: bytes, limit: int) -> bool:
    """The definition: brackets outside strings, one byte at a time."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
            continue
        if byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


_BYTES = st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b",", b":", b"1",
                                   b"\n", b'\\"', b"[[[[", b"]]]]", b'"[[["']),
                  max_size=80).map(b"".join)


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(_BYTES, st.integers(min_value=0, max_value=6))
def test_depth_check_agrees_with_the_byte_scan_on_any_bytes(body: bytes, limit: int) -> None:
    assert json_depth_exceeds(body, limit) == depth_exceeds_by_scanning(body, limit)
    # Told the body has a backslash-quote when it has none, it takes the long way: same answer.
    marks = body_marks(body)._replace(backslash_quote=True)
    assert json_depth_exceeds(body, limit, marks) == depth_exceeds_by_scanning(body, limit)


def test_depth_check_on_the_shapes_that_matter() -> None:
    for body, limit in [(b"[" * 65 + b"]" * 65, 64), (b"[" * 64 + b"]" * 64, 64),
                        (b'{"a": "' + b"[" * 100 + b'"}', 64), (b'"\\"' + b"[" * 100, 64),
                        (b"]" * 100 + b"[" * 64, 64), (b'["\\\\"' + b"[" * 64, 64)]:
        assert json_depth_exceeds(body, limit) == depth_exceeds_by_scanning(body, limit), body


_SUSPECT_NUMBER = re.compile(rb"NaN|Infinity|[eE][+]?0*[0-9]{3,}|[0-9]{300,}")


def _marks_by_re(body: bytes) -> BodyMarks:
    return BodyMarks(_SUSPECT_NUMBER.search(body) is not None,
                     re.search(rb"[0-9]{19}", body) is not None, b'\\"' in body)


_NUMBER_PIECES = [b"NaN", b"Na", b"N", b"Infinity", b"e", b"E", b"+", b"E+", b"0", b"7",
                  b"1" * 150, b"9" * 99, b"1" * 18, b" ", b'"', b"x", b"-", b"\\", b"\\\\"]


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_NUMBER_PIECES), max_size=14).map(b"".join)
       | st.binary(max_size=64))
def test_the_body_marks_are_those_the_regexes_give(body: bytes) -> None:
    assert body_marks(body) == _marks_by_re(body)
    # Past ``_FOLDED_BELOW`` the body is read by Vectorscan: spaces change no mark.
    padded = body + b" " * 16_384
    assert body_marks(padded) == _marks_by_re(padded)


def test_the_body_marks_on_the_shapes_that_matter() -> None:
    assert body_marks(b'{"a": 1.5, "b": "x"}') == (False, False, False)
    assert body_marks(b'{"a": NaN}').suspect_number
    assert body_marks(b'{"a": 1e308}').suspect_number
    assert not body_marks(b'{"a": 1e30}').suspect_number
    assert body_marks(b'{"n": 12345678901234567890}').long_integer
    assert not body_marks(b'{"n": 1234567890123456789.0e1}').suspect_number
    assert body_marks(b'{"s": "say \\"hi\\""}').backslash_quote
    assert body_marks(b'\xff\xfe not UTF-8 ' + b"9" * 19) == (False, True, False)
