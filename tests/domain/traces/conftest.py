"""Fixtures shared by the trace-ingest tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from app.auth.service import Principal, Scope
from app.db import Database
from app.models import Policy


@pytest.fixture
def new_principal(database: Database) -> Callable[[], Principal]:
    """Makes an ingest principal of a tenant of its own, with a policy named after the tenant
    (policy names are global)."""

    def make() -> Principal:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        with database.session() as session:
            session.add(Policy(tenant=tenant, name=tenant, base_model="m"))
            session.commit()
        return Principal(key_id=1, tenant=tenant, scopes=frozenset({Scope.ingest}), name="test")

    return make


@pytest.fixture
def principal(new_principal: Callable[[], Principal]) -> Principal:
    return new_principal()
