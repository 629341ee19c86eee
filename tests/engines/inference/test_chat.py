"""OpenAI chat messages in the full format become what every chat template understands."""

from __future__ import annotations

from workers.inference.chat import content_text, flatten_messages


def test_part_lists_become_their_text_and_media_parts_carry_none() -> None:
    parts = [{"type": "text", "text": "Stage IV."}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "PFS > 180 days?"}]
    assert content_text(parts) == "Stage IV.\nPFS > 180 days?"
    assert content_text(None) == "" and content_text("plain") == "plain"


def test_tool_calls_and_tool_results_are_kept_as_text() -> None:
    messages = [
        {"role": "developer", "content": "Answer YES or NO."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"id\": 7}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "ECOG 1"}]},
    ]
    assert flatten_messages(messages) == [
        {"role": "developer", "content": "Answer YES or NO."},
        {"role": "assistant", "content": '[{"arguments": "{\\"id\\": 7}", "name": "lookup"}]'},
        {"role": "tool", "content": "ECOG 1"},
    ]
