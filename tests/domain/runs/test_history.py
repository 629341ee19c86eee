"""A run keeps a bounded per-step history that still covers the whole run."""

from __future__ import annotations

from app.runs.training import thin_history


def test_a_short_history_is_kept_whole():
    history = [{"step": float(k)} for k in range(1, 11)]
    assert thin_history(history, limit=400) == history


def test_a_long_history_is_thinned_evenly_from_first_to_last_step():
    history = [{"step": float(k)} for k in range(1, 1001)]
    kept = [h["step"] for h in thin_history(history, limit=5)]
    # indices round(i · 999 / 4) for i = 0..4: 0, 250, 500, 749, 999
    assert kept == [1.0, 251.0, 501.0, 750.0, 1000.0]
