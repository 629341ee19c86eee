"""A large batch is admitted partly by helper processes (``app.traces.parallel``): the results and
the stored rows are those of one process, the parts come back in the batch's order (repeats
across parts judged as in one insert), and a helper that died costs nothing but time."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import select

from app.auth.service import Principal
from app.db import Database
from app.models import Trace
from app.observability import REGISTRY
from app.settings import Settings
from app.traces import parallel, service
from app.traces.schemas import ItemStatus

HELPERS = 2
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def helper_settings(settings: Settings) -> Iterator[Settings]:
    shared = settings.model_copy(update={"ingest_helper_processes": HELPERS,
                                         "ingest_parallel_min_items": 6})
    service.start_helpers(shared)
    assert service._helpers.wait_ready(120), "the helpers did not start"
    yield shared
    service._helpers.shutdown()


@pytest.fixture
def validated_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The indexes of the items validated in this process: the helpers import their own,
    unpatched module."""
    indexes: list[int] = []
    validate = service._validate

    def counted(index: int, raw: Any, *args: Any) -> Any:
        indexes.append(index)
        return validate(index, raw, *args)

    monkeypatch.setattr(service, "_validate", counted)
    return indexes


def batch(policy: str) -> list[Any]:
    def trace(ext: str, answer: str = "ANSWER: YES", **extra: Any) -> dict[str, Any]:
        return {"external_id": ext, "policy": policy, "response": answer,
                "messages": [{"role": "user", "content": f"case {ext}"}], **extra}

    items: list[Any] = [trace(f"n{i}") for i in range(12)]
    items[1] = trace("n1", "call me at +44 20 7946 0958")  # redacted
    items[3] = {"external_id": "n10"}  # invalid: n10 (a helper's) is the first valid one
    items[4] = trace("n4", outcome={"name": "correct", "value": 1.0})
    items[5] = trace("alice@example.com")  # PII in the external_id: refused
    items[6] = trace("n0")  # the first part's n0, again: a duplicate across parts
    items[7] = {**trace("n7"), "policy": "no-such-policy"}
    items[9] = trace("n2", "ANSWER: NO")  # n2 with other content: a conflict across parts
    items[11] = trace("n11", metadata={"phone": "+1 415 555 0100"})
    return items


def stored(database: Database, tenant: str) -> list[dict[str, Any]]:
    columns = ("external_id", "messages", "response", "metadata", "redactions", "split",
               "content_hash", "trainable")
    with database.session() as session:
        rows = session.execute(select(*(getattr(Trace, "meta" if c == "metadata" else c)
                                        for c in columns)).where(Trace.tenant == tenant)
                               .order_by(Trace.external_id))
        return [dict(zip(columns, row, strict=True)) for row in rows]


def admitted(where: str) -> float:
    """The traces admitted so far by ``where`` (the Prometheus counter)."""
    return REGISTRY.get_sample_value("tracelearn_ingest_admitted_traces_total",
                                     {"where": where}) or 0.0


def outcome(result: Any) -> tuple[Any, ...]:
    return (result.index, result.external_id, result.status,
            result.error["type"] if result.error else None)


def test_a_batch_shared_with_helpers_is_admitted_as_in_one_process(
    database: Database, settings: Settings, helper_settings: Settings,
    validated_here: list[int], new_principal: Callable[[], Principal],
) -> None:
    alone, shared = new_principal(), new_principal()
    with database.session() as session:
        expected = service.ingest(session, alone, batch(alone.tenant), settings)
        session.commit()
    validated_here.clear()
    before = admitted("request"), admitted("helper")
    with database.session() as session:
        got = service.ingest(session, shared, batch(shared.tenant), helper_settings)
        session.commit()
    assert validated_here == [0, 1, 2, 3], "the request's thread admits the first part only"
    assert (admitted("request") - before[0], admitted("helper") - before[1]) == (4, 8)
    assert REGISTRY.get_sample_value("tracelearn_ingest_helpers") == HELPERS
    assert [outcome(r) for r in got.results] == [outcome(r) for r in expected.results]
    assert got.counts == expected.counts
    assert (got.counts["created"], got.counts["invalid"]) == (7, 3)
    assert got.results[6].status is ItemStatus.duplicate
    assert got.results[6].id == got.results[0].id
    rows_alone, rows_shared = stored(database, alone.tenant), stored(database, shared.tenant)
    for row in rows_alone + rows_shared:
        row.pop("split"), row.pop("content_hash")  # the tenant and policy names differ
    assert rows_shared == rows_alone
    redacted = {r["external_id"]: r for r in rows_shared}
    assert redacted["n1"]["response"] == "call me at [PHONE]"
    assert redacted["n11"]["metadata"] == {"phone": "[PHONE]"}


def test_a_helper_that_died_costs_its_batch_nothing(
    database: Database, settings: Settings, helper_settings: Settings,
    caplog: pytest.LogCaptureFixture, new_principal: Callable[[], Principal],
) -> None:
    alone, shared = new_principal(), new_principal()
    with database.session() as session:
        expected = service.ingest(session, alone, batch(alone.tenant), settings)
        session.commit()
    helpers = psutil.Process(os.getpid()).children()
    executor = service._helpers.executor(HELPERS)
    assert executor is not None
    pids = {p.pid for p in executor._processes.values()}
    assert pids and pids <= {p.pid for p in helpers}
    # Handles taken before the kill: the pool's own thread may reap a killed helper at once,
    # and a pid looked up after that is gone.
    doomed = [psutil.Process(pid) for pid in pids]
    for proc in doomed:
        proc.kill()
    psutil.wait_procs(doomed, timeout=30)
    before = admitted("request"), admitted("helper")
    with caplog.at_level(logging.WARNING), database.session() as session:
        got = service.ingest(session, shared, batch(shared.tenant), helper_settings)
        session.commit()
    assert "helper process died" in caplog.text
    assert (admitted("request") - before[0], admitted("helper") - before[1]) == (12, 0)
    assert REGISTRY.get_sample_value("tracelearn_ingest_helpers") == 0
    assert [outcome(r) for r in got.results] == [outcome(r) for r in expected.results]
    assert len(stored(database, shared.tenant)) == len(stored(database, alone.tenant)) == 7
    # The broken pool was dropped: the next large batch starts a new one.
    assert service._helpers.executor(HELPERS) is None
    assert service._helpers.wait_ready(120)
    assert service._helpers.executor(HELPERS) is not executor


def test_batches_below_the_threshold_and_a_cold_pool_stay_in_process(
    database: Database, settings: Settings, validated_here: list[int],
    new_principal: Callable[[], Principal],
) -> None:
    principal = new_principal()
    service._helpers.shutdown()
    cold = settings.model_copy(update={"ingest_helper_processes": 1,
                                       "ingest_parallel_min_items": 12})
    try:
        with database.session() as session:
            small = service.ingest(session, principal, batch(principal.tenant)[:11], cold)
            assert service._helpers.executor(1) is None  # a small batch starts no helper
            big = service.ingest(session, principal, batch(principal.tenant), cold)
            session.commit()
        assert validated_here == [*range(11), *range(12)]  # the first big one: the pool was cold
        assert small.counts["created"] == 6 and big.counts["duplicate"] == 7
    finally:
        service._helpers.shutdown()


def test_the_helper_count_follows_the_cores_and_the_setting(settings: Settings) -> None:
    assert parallel.helper_count(settings.model_copy(update={"ingest_helper_processes": 0})) == 0
    assert parallel.helper_count(settings.model_copy(update={"ingest_helper_processes": 5})) == 5
    cores = len(os.sched_getaffinity(0))
    # One core for each API process and one for the database's share: none on two cores.
    for api, expected in [(1, max(0, min(cores - 2, 3))), (cores, 0), (cores + 1, 0)]:
        auto = settings.model_copy(update={"ingest_helper_processes": None,
                                           "api_processes": api})
        assert parallel.helper_count(auto) == expected, api
    if cores >= 4:
        two_processes = settings.model_copy(update={"ingest_helper_processes": None,
                                                     "api_processes": 2})
        assert parallel.helper_count(two_processes) == max(0, min(cores // 2 - 2, 3))


def test_helpers_exit_when_their_api_process_is_killed() -> None:
    """A process killed outright cannot shut its helpers down: they notice and exit."""
    code = (
        "import time; from app.settings import Settings; from app.traces import service\n"
        "settings = Settings(environment='test', ingest_helper_processes=2)\n"
        "service.start_helpers(settings)\n"
        "assert service._helpers.wait_ready(120)\n"
        "executor = service._helpers.executor(2)\n"
        "print(*executor._processes, flush=True)\n"
        "time.sleep(600)\n"
    )
    api = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert api.stdout is not None
        pids = [int(pid) for pid in api.stdout.readline().split()]
        helpers = [psutil.Process(pid) for pid in pids]
        assert len(helpers) == 2 and all(h.is_running() for h in helpers)
    finally:
        api.kill()
        api.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
            h.is_running() and h.status() != psutil.STATUS_ZOMBIE for h in helpers):
        time.sleep(0.2)
    assert not [h.pid for h in helpers if h.is_running() and h.status() != psutil.STATUS_ZOMBIE]
