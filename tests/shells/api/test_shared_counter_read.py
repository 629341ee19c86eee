"""``SharedRead``: concurrent requests share the read of the cache counters, but each is given
a read that began after it arrived, so a key revoked before a request is refused by it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from app.cache import SharedRead


class Reads:
    """A read function whose n-th call returns n; a call may be held until released, or fail."""

    def __init__(self, hold: frozenset[int] = frozenset(), fail: frozenset[int] = frozenset()
                 ) -> None:
        self.calls = 0
        self.hold, self.fail = hold, fail
        self.started = {n: threading.Event() for n in range(1, 10)}
        self.release = {n: threading.Event() for n in range(1, 10)}
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self.calls += 1
            n = self.calls
        self.started[n].set()
        if n in self.hold:
            assert self.release[n].wait(10)
        if n in self.fail:
            raise ConnectionError(f"read {n} failed")
        return n


def _in_thread(call: Callable[[], int], out: dict[str, object], name: str) -> threading.Thread:
    def run() -> None:
        try:
            out[name] = call()
        except ConnectionError as exc:
            out[name] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _waiting(shared: SharedRead[int], n: int) -> None:
    """Until ``n`` threads wait on ``shared``'s condition."""
    deadline = time.monotonic() + 10
    while len(shared._cond._waiters) < n:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_calls_one_after_another_each_read_afresh() -> None:
    shared, reads = SharedRead[int](), Reads()
    assert [shared.get(reads) for _ in range(3)] == [1, 2, 3]


def _callers_during_read_one(
    shared: SharedRead[int], reads: Reads, n: int
) -> tuple[dict[str, object], list[threading.Thread]]:
    """A caller ("first") whose read 1 is held, then ``n`` callers ("later<i>") that arrive
    while it is in flight; read 1 is released once they all wait."""
    out: dict[str, object] = {}
    first = _in_thread(lambda: shared.get(reads), out, "first")
    assert reads.started[1].wait(10)
    later = [_in_thread(lambda: shared.get(reads), out, f"later{i}") for i in range(n)]
    _waiting(shared, n)
    reads.release[1].set()
    return out, [first, *later]


def test_callers_arriving_during_a_read_share_the_next_one_never_the_one_in_flight() -> None:
    # Read 1 began before the later callers: what it returns may predate them (a key revoked
    # just before they arrived), so they must not take it.
    shared, reads = SharedRead[int](), Reads(hold=frozenset({1}))
    out, threads = _callers_during_read_one(shared, reads, 5)
    for thread in threads:
        thread.join(10)
    assert out["first"] == 1
    assert {out[f"later{i}"] for i in range(5)} == {2}
    assert reads.calls == 2


def test_a_failed_shared_read_fails_its_reader_and_the_others_read_for_themselves() -> None:
    shared, reads = SharedRead[int](), Reads(hold=frozenset({1, 2}), fail=frozenset({2}))
    out, threads = _callers_during_read_one(shared, reads, 3)
    assert reads.started[2].wait(10)  # one of the three runs read 2, the others wait for it
    _waiting(shared, 2)
    reads.release[2].set()
    for thread in threads:
        thread.join(10)
    results = [out[f"later{i}"] for i in range(3)]
    assert out["first"] == 1
    assert sum(isinstance(r, ConnectionError) for r in results) == 1
    assert sorted(r for r in results if isinstance(r, int)) == [3, 4]
    assert reads.calls == 4
    # Afterwards it shares again.
    assert shared.get(reads) == 5


def test_an_exception_propagates_to_a_lone_caller() -> None:
    shared, reads = SharedRead[int](), Reads(fail=frozenset({1}))
    with pytest.raises(ConnectionError, match="read 1 failed"):
        shared.get(reads)
    assert shared.get(reads) == 2
