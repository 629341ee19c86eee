"""Dashboard fixtures: a signed-in client (the model, adapters and engine come from
``tests.support.promotion``)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_INPUT.search(html)
    assert match, "page has no CSRF token"
    return match.group(1)


def sign_in(client: TestClient, key: str) -> str:
    """Sign in through the form; returns the session's CSRF token."""
    page = client.get("/dashboard/login")
    r = client.post("/dashboard/login",
                    data={"api_key": key, "csrf_token": csrf_from(page.text), "next": "/dashboard"})
    assert r.status_code == 200 and "Policies" in r.text, r.text[:500]
    return csrf_from(r.text)


@pytest.fixture
def admin_key(make_key, tenant) -> str:
    return str(make_key(tenant, "ingest,read,admin"))


@pytest.fixture
def signed_in(client: TestClient, admin_key: str) -> str:
    return sign_in(client, admin_key)

