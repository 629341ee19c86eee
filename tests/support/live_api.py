"""Fixtures for tests that talk to a running API over HTTP: a fresh tenant's admin key, a client
and the official OpenAI SDK for the module's ``api_url`` (each such module or conftest provides
``api_url``), and the stored trace behind an external id."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
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


@pytest.fixture
def sdk(api_url: str, key: str) -> openai.OpenAI:
    """The official OpenAI client on the proxy, no retries (a test sees every answer)."""
    return openai.OpenAI(api_key=key, base_url=f"{api_url}/v1", max_retries=0)


def stored_trace(http: httpx.Client, external_id: str) -> dict[str, Any] | None:
    """The trace stored under ``external_id`` for ``http``'s tenant, as GET returns it."""
    items = http.get("/v1/traces", params={"external_id": external_id}).json()["items"]
    assert len(items) <= 1, items
    return dict(items[0]) if items else None
