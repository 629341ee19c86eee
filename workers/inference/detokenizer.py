"""Token ids to text while they are generated (the local serving engine's streaming)."""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """The text of a growing token sequence, as deltas that never split a character.

    Decoding the ids one by one would break multi-byte characters spread over several byte-level
    tokens (each half decodes to U+FFFD) and lose the spaces some decoders add between tokens;
    so, as transformers' and vLLM's detokenizers do, each step decodes a short window ending at
    the new id and passes on what grew past the window's previous text, unless it ends in U+FFFD
    (a character still incomplete). Joined, the deltas are the text of one decode of all ids.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # text up to here has been passed on

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        """Add one id; returns the new text it completes (often ``""``)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before):]

    def flush(self, cut: bool) -> str:
        """The text still held at the end. ``cut``: generation hit ``max_tokens``, so a dangling
        partial character is dropped (OpenAI never returns half a character); otherwise it is
        what the model generated and is kept (as U+FFFD)."""
        before = self._decode(self.ids[self._prefix:self._read])
        rest = self._decode(self.ids[self._prefix:])[len(before):]
        self._prefix = self._read = len(self.ids)
        return rest.rstrip("\ufffd") if cut else rest
