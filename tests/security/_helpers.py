"""Helpers shared by the security, fuzz and reliability tests (imported relatively)."""

from __future__ import annotations

from typing import Any

import httpx


def trace_body(ext: str, policy: str, content: str = "Patient note", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "external_id": ext,
        "policy": policy,
        "messages": [{"role": "user", "content": content}],
        "response": "Reasoning... ANSWER: YES",
    }
    body.update(extra)
    return body


def assert_problem(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A refusal is a 4xx RFC 9457 problem with a stable type, never a 5xx."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == response.status_code
    assert body["type"].startswith("https://tracelearn.dev/problems/")
    assert body["title"] and isinstance(body["detail"], str)
    return body
