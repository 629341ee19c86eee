"""The body guards' fast checks against the plain definitions they replace: the depth check
is a byte-by-byte scan done in C, and the suspect-number precheck is one alternation searched as
substrings."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from app.limits import _suspect_number, json_depth_exceeds


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


def test_depth_check_on_the_shapes_that_matter() -> None:
    for body, limit in [(b"[" * 65 + b"]" * 65, 64), (b"[" * 64 + b"]" * 64, 64),
                        (b'{"a": "' + b"[" * 100 + b'"}', 64), (b'"\\"' + b"[" * 100, 64),
                        (b"]" * 100 + b"[" * 64, 64), (b'["\\\\"' + b"[" * 64, 64)]:
        assert json_depth_exceeds(body, limit) == depth_exceeds_by_scanning(body, limit), body


_SUSPECT_NUMBER = re.compile(rb"NaN|Infinity|[eE][+]?0*[0-9]{3,}|[0-9]{300,}")


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from([b"NaN", b"Na", b"N", b"Infinity", b"e", b"E", b"+", b"E+", b"0", b"7",
                                 b"1" * 150, b"9" * 99, b" ", b'"', b"x", b"-"]), max_size=14).map(b"".join))
def test_the_number_precheck_trips_exactly_where_the_alternation_does(body: bytes) -> None:
    assert _suspect_number(body) == (_SUSPECT_NUMBER.search(body) is not None)
