"""Fixtures shared by the security and bad-input tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from app.db import Database
from app.models import Outcome, Trace


@pytest.fixture
def stored_counts(database: Database) -> Callable[[str], tuple[int, int]]:
    """(traces, outcomes) stored for a tenant: the 'nothing half-written' probe."""

    def _count(tenant: str) -> tuple[int, int]:
        with database.session() as session:
            traces = session.scalar(
                select(func.count()).select_from(Trace).where(Trace.tenant == tenant)
            )
            outcomes = session.scalar(
                select(func.count()).select_from(Outcome).where(Outcome.tenant == tenant)
            )
        return int(traces or 0), int(outcomes or 0)

    return _count
