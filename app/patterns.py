"""Several regular expressions, one pass: which of a set of patterns match a text, read by
Vectorscan (the open fork of Intel's Hyperscan, statically linked in the ``hyperscan`` wheel),
where ``re`` makes a pass per pattern and tries each at every position.

Used where one text meets many prechecks: every PII detector's needs on a trace
(``app.traces.redaction``), and the number and escape checks on a request body
(``app.limits``). The patterns are read as PCRE: ``\\d``, ``\\s``, ``\\w`` and ``\\b`` are
ASCII, as in ``re`` on ASCII text; lookarounds and back-references are refused at compile
time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

import hyperscan


class Pattern(NamedTuple):
    """One expression of a set; several may share an ``id`` (any of them matching is that id
    matching)."""

    id: int
    expression: bytes
    caseless: bool = False


class PatternSet:
    """Patterns compiled once, on the first scan, into one database; each thread scans with
    its own scratch space (a scratch serves one scan at a time). ``utf8``: the patterns hold
    characters beyond ASCII, so they are read as UTF-8, and every text scanned must then be
    valid UTF-8 (Vectorscan's behaviour on other bytes is undefined); without it any bytes
    may be scanned. The scan releases the GIL, and each match takes it back: where other
    threads are busy, the scanning thread may then wait a switch interval (5 ms) for it, so
    the event loop's short texts are better read otherwise (``app.limits.body_marks``)."""

    def __init__(self, patterns: Sequence[Pattern], *, utf8: bool = False) -> None:
        self._patterns = tuple(patterns)
        self._utf8 = utf8
        self._database: hyperscan.Database | None = None
        self._compiling = threading.Lock()
        self._scratch = threading.local()

    def _compiled(self) -> hyperscan.Database:
        with self._compiling:
            if self._database is None:
                database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
                # SINGLEMATCH: whether a pattern matches is all that is asked, not where.
                base = hyperscan.HS_FLAG_SINGLEMATCH | (
                    hyperscan.HS_FLAG_UTF8 if self._utf8 else 0)
                database.compile(
                    expressions=[p.expression for p in self._patterns],
                    ids=[p.id for p in self._patterns], elements=len(self._patterns),
                    flags=[base | (hyperscan.HS_FLAG_CASELESS if p.caseless else 0)
                           for p in self._patterns])
                self._database = database
            return self._database

    def matched(self, text: bytes) -> set[int]:
        """The ids of the patterns that match somewhere in ``text``."""
        database = self._database or self._compiled()
        scratch = getattr(self._scratch, "space", None)
        if scratch is None:
            scratch = self._scratch.space = hyperscan.Scratch(database)
        hits: set[int] = set()
        database.scan(text, scratch=scratch, match_event_handler=lambda i, *_: hits.add(i))
        return hits
