"""A real `tracelearn api` process serving the bundled tiny model, for the official OpenAI SDK
to talk to."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.settings import get_settings
from tests.conftest import api_process
from tests.support.seeding import build_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture(scope="session")
def serving_model_dir() -> Path:
    return build_model(get_settings().model_cache)


@pytest.fixture(scope="module")
def api_url(
    pg_url: str, serving_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("proxy-api")
    env = {"TRACELEARN_DATABASE_URL": pg_url, "TRACELEARN_DATA_DIR": str(tmp_path / "data"),
           "TRACELEARN_BASE_MODEL_DIR": str(serving_model_dir),
           "TRACELEARN_LOG_LEVEL": "WARNING", "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0"}
    with api_process(env, tmp_path / "api.log") as url:
        yield url


@pytest.fixture
def policy(http: httpx.Client) -> str:
    name = f"p-{uuid.uuid4().hex[:10]}"
    r = http.post("/v1/policies", json={"name": name, "redaction_enabled": False})
    assert r.status_code == 201, r.text
    return name
