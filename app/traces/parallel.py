"""Helper processes for the CPU-bound part of a large batch.

Admitting a trace (validation, hashing, redaction: ``service.admit_items``) is pure Python,
~40 µs a trace, under the GIL of the process that received the batch; a 1,000-trace batch
would keep one core busy for ~40 ms while the others idle. A batch of at least
``ingest_parallel_min_items`` traces is therefore split: the request's own thread admits the
first part while helper processes admit the others in chunks, and the result is the one a
single process gives (``service.ingest`` inserts chunks as they come back, holding only the
external_ids the batch repeats for the end, in the batch's order).

The helpers are spawned (never forked: the API process runs threads) when a server starts, or
else the first time a batch is large enough, and are warmed up (they import the admission
code) in the background:
batches that arrive before they are ready are admitted in process, as are the parts of a
helper that died (its batch still succeeds; the pool is started afresh for the next one). A
helper exits by itself once its API process is gone, killed or not.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from app.cores import usable_cores
from app.observability import INGEST_HELPERS
from app.settings import Settings

log = logging.getLogger(__name__)

# More helpers than this gain little on one batch (its insert and the request's own part remain)
# and each is a process of ~100 MiB.
MAX_DEFAULT_HELPERS = 3
# How often a helper checks that its API process is still there.
PARENT_CHECK_S = 1.0
# After helpers failed to start, batches are admitted in process for this long before another
# start is tried.
RETRY_AFTER_S = 60.0

T = TypeVar("T")


def default_helpers(api_processes: int) -> int:
    """Each of ``api_processes`` API processes gets its share of the usable cores, one of them
    its own and one left for the database's share of a batch (its insert, when Postgres runs
    beside it): a helper for each of the others, at most ``MAX_DEFAULT_HELPERS``. On two cores
    a helper made 1,000-trace batches slower (13.0k and 12.8k rows/s without, 11.0k and 11.3k
    with one, back to back): it shared the second core with Postgres, and the request waited
    for its part."""
    return max(0, min(usable_cores() // api_processes - 2, MAX_DEFAULT_HELPERS))


def helper_count(settings: Settings) -> int:
    """How many helpers a large batch is shared with (0: none)."""
    configured = settings.ingest_helper_processes
    return default_helpers(settings.api_processes) if configured is None else configured


def _load(module: str) -> None:
    """Run in each new helper: import what its tasks will need, before the first task."""
    importlib.import_module(module)


def _watch_parent(parent: int) -> None:
    """Run in each new helper as it starts: exit once the API process that started it is gone.
    A process killed outright (SIGKILL, the OOM killer) cannot tell its helpers, and a helper
    waiting for work would otherwise live on as an orphan."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="ingest-helper-parent-watch", daemon=True).start()


class HelperPool:
    """Spawned processes that run pure functions on parts of a batch."""

    def __init__(self, warm_module: str) -> None:
        self._warm_module = warm_module
        self._lock = threading.RLock()  # a warm-up's callback may run in the starting thread
        self._executor: ProcessPoolExecutor | None = None
        self._size = 0
        self._ready = threading.Event()
        self._failed_at = -RETRY_AFTER_S

    def executor(self, size: int) -> ProcessPoolExecutor | None:
        """The pool of ``size`` helpers when it is up and warm; otherwise None, and it is
        started (or resized) in the background for the next batch. A pool whose helpers
        failed to start is tried again ``RETRY_AFTER_S`` later, not at every batch."""
        with self._lock:
            if self._executor is not None and self._size == size:
                return self._executor if self._ready.is_set() else None
            if size <= 0 or time.monotonic() < self._failed_at + RETRY_AFTER_S:
                return None
            self._shutdown_locked()
            self._start_locked(size)
            return None

    def _start_locked(self, size: int) -> None:
        executor = ProcessPoolExecutor(max_workers=size,
                                       mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_watch_parent, initargs=(os.getpid(),))
        ready = threading.Event()
        warming = [executor.submit(_load, self._warm_module) for _ in range(size)]
        remaining = [len(warming)]
        count_lock = threading.Lock()

        def warmed(future: Future[None]) -> None:
            if future.cancelled():
                return
            if (error := future.exception()) is not None:
                log.warning("the ingest helpers failed to start (%s); batches are admitted in "
                            "the API process", error)
                self._failed(executor)
                return
            with count_lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    ready.set()
                    INGEST_HELPERS.set(size)

        self._executor, self._size, self._ready = executor, size, ready
        for future in warming:
            future.add_done_callback(warmed)

    def _shutdown_locked(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            INGEST_HELPERS.set(0)
        self._executor, self._size = None, 0
        self._ready = threading.Event()

    def _failed(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self.discard(executor):
                self._failed_at = time.monotonic()

    def discard(self, executor: ProcessPoolExecutor) -> bool:
        """Drop ``executor`` (one of its helpers died; the next large batch starts a new pool);
        whether it was still the pool in use."""
        with self._lock:
            if self._executor is not executor:
                return False
            self._shutdown_locked()
            return True

    def shutdown(self) -> None:
        with self._lock:
            self._shutdown_locked()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the pool started by ``executor`` is warm within ``timeout`` seconds (tests,
        benchmarks)."""
        return self._ready.wait(timeout)


def submit_all(executor: ProcessPoolExecutor, fn: Callable[..., T],
               parts: Sequence[Any], *args: Any) -> list[Future[T]]:
    """``fn(part, *args)`` of each part, in the helpers. A pool found broken (a helper died
    since its last task) gives failed futures, as a helper dying now would."""
    futures: list[Future[T]] = []
    for part in parts:
        try:
            futures.append(executor.submit(fn, part, *args))
        except BrokenProcessPool as exc:
            failed: Future[T] = Future()
            failed.set_exception(exc)
            futures.append(failed)
    return futures
