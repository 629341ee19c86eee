"""A trace's content hash is the contract that makes a retry a duplicate: its bytes must stay
those of ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``, which every
stored hash was made of, whichever serializer writes them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.traces.service import canonical_digest


def _stdlib_digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


_FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e-4, 9.99e-5, 1e-5, -7.9e-5, 1e-6, 3.19e-9, 1e-10, 1e15, 1.5e16, 1e22, -0.0, 5e-324])
_TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["3e-5", "x 1.0000", "\x00\x1f\x7f\u2028é\"\\", "ünïcode", "Z", "a", "é"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | _FLOATS
    | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(_JSON)
def test_canonical_digest_is_the_stdlib_serialisation_s_hash(value: Any) -> None:
    assert canonical_digest(value) == _stdlib_digest(value)


def test_the_floats_orjson_writes_otherwise_and_big_integers_still_hash_as_before() -> None:
    for value in [{"t": 1e-05}, {"t": 1e-06}, [-7.942422464989632e-05], {"n": 2**64},
                  {"b": "é", "a": [3.19e-09, {"z": 1, "y": None}]}]:
        assert canonical_digest(value) == _stdlib_digest(value), value
