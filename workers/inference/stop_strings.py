"""Stop strings applied while an answer is generated: the text is passed on as it comes, except
a possible beginning of a stop string at its end, which is held until the next text decides; at
the first stop string the answer ends, without it (OpenAI's ``stop``)."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0
        self.stopped = False
        """A stop string was found: the answer is complete, generation can end."""

    def feed(self, delta: str) -> str:
        """Add generated text; returns what can be passed on now."""
        if self.stopped:
            return ""
        self.text += delta
        # Text already passed on cannot hold the start of a stop string: a possible one was held.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest end of the text that is a proper beginning of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """At the end of generation: the held text, which no stop string completed."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
