"""Fixtures for tests that talk to a running API over HTTP: a fresh tenant's admin key, and a
client for the module's ``api_url`` (each such module or conftest provides ``api_url``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest


@pytest.fixture
def key(make_key: Callable[..., str]) -> str:
    """An ``ingest,read,admin`` key of a tenant no other test uses."""
    return make_key(f"t-{uuid.uuid4().hex[:10]}", "ingest,read,admin")


@pytest.fixture
def http(api_url: str, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"},
                      timeout=120) as client:
        yield client
