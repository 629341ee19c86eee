"""The precedence rule itself: a pure function of origin and label time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.models import OutcomeOrigin, OutcomeSource
from app.traces.outcomes import Label, label_time, outranks

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def label(origin: OutcomeOrigin, at: datetime, value: object = True) -> Label:
    return Label(trace_external_id="t", name="correct", value=value, source=OutcomeSource.api,
                 origin=origin, labelled_at=at)


def test_feedback_outranks_inline_even_when_the_inline_label_is_later() -> None:
    inline_later = label(OutcomeOrigin.inline, T0 + timedelta(days=1))
    feedback_earlier = label(OutcomeOrigin.feedback, T0)
    assert outranks(feedback_earlier, inline_later)
    assert not outranks(inline_later, feedback_earlier)


def test_within_one_origin_the_later_label_wins_and_a_tie_goes_to_the_newcomer() -> None:
    for origin in OutcomeOrigin:
        early, late = label(origin, T0), label(origin, T0 + timedelta(seconds=1))
        assert outranks(late, early) and not outranks(early, late)
        assert outranks(label(origin, T0, False), early)


def test_label_time_defaults_to_now_reads_naive_as_utc_and_caps_the_future() -> None:
    now = T0 + timedelta(days=10)
    assert label_time(None, now) == now
    assert label_time(datetime(2026, 1, 2), now) == datetime(2026, 1, 2, tzinfo=UTC)
    assert label_time(now + timedelta(days=365), now) == now
