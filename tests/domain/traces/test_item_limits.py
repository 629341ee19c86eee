"""The metadata size limit: its fast bound never lets through what the stdlib measure refuses."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.traces.service import _metadata_size_bound

_NUMBER = st.integers() | st.floats() | st.sampled_from(
    [1e-5, -6.4e-08, float("-inf"), float("nan"), 1e16, 2**64, 5e-324])
_VALUE = st.recursive(
    st.none() | st.booleans() | _NUMBER | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=6),
    max_leaves=24,
)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.dictionaries(st.text(max_size=4), _VALUE, max_size=6))
def test_the_bound_is_never_below_the_stdlib_length(metadata: dict[str, Any]) -> None:
    exact = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False))
    assert _metadata_size_bound(metadata) >= exact


def test_many_padded_exponents_stay_under_the_bound() -> None:
    metadata = {"x": [-1.2345678901234567e-08] * 500, "y": [float("-inf")] * 500}
    exact = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False))
    assert _metadata_size_bound(metadata) >= exact
