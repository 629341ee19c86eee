"""`tracelearn demo --url` against a real `tracelearn api` process: the server and the key are
checked before anything slow, and the policy it trains is the one the user names."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.db import set_database
from app.settings import get_settings, set_settings
from tests.conftest import REPO, api_process, free_port, make_settings
from tests.support.seeding import build_model

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_model(get_settings().model_cache)


@pytest.fixture(scope="module")
def api_url(pg_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("demo-api")
    env = {"TRACELEARN_DATABASE_URL": pg_url, "TRACELEARN_DATA_DIR": str(tmp / "data"),
           "TRACELEARN_BASE_MODEL_DIR": str(model_dir), "TRACELEARN_LOG_LEVEL": "WARNING",
           "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0"}
    with api_process(env, tmp / "api.log") as url:
        yield url


@pytest.fixture
def cli_settings(tmp_path: Path, pg_url: str, model_dir: Path) -> Iterator[Path]:
    """The in-process demo's settings (the api process's database, its own data dir); yields
    the data dir."""
    set_settings(make_settings(pg_url, tmp_path / "data", base_model_dir=model_dir))
    yield tmp_path / "data"
    set_database(None)
    set_settings(None)


def demo_process(tmp_path: Path, pg_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`tracelearn demo ARGS` as a user runs it, with a base model dir that does not exist: a demo
    that reached the model stage would fail there instead of refusing."""
    env = {"TRACELEARN_DATABASE_URL": pg_url, "TRACELEARN_DATA_DIR": str(tmp_path / "data"),
           "TRACELEARN_BASE_MODEL_DIR": str(tmp_path / "no-model"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "app.cli", "demo", *args], cwd=REPO,
                          env=os.environ | env, capture_output=True,
                          text=True, timeout=120)


def test_a_closed_port_is_one_line_with_the_fix_and_exit_2(tmp_path, pg_url):
    url = f"http://127.0.0.1:{free_port()}"
    proc = demo_process(tmp_path, pg_url, "--url", url, "--key", "tl_whatever")
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert out.splitlines() == [
        f"demo refused: no tracelearn server at {url}: start it with `tracelearn up`"
    ]
    assert not (tmp_path / "data").exists()  # the model stage never started


def test_a_refused_key_is_one_line_with_the_fix_and_exit_2(tmp_path, pg_url, api_url):
    proc = demo_process(tmp_path, pg_url, "--url", api_url, "--key", "tl_not-a-real-key")
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert out.splitlines() == [
        "demo refused: the key was refused (401): create one with "
        "`tracelearn keys create --tenant demo --scopes ingest,read,admin`"
    ]
    assert "Traceback" not in out
    assert not (tmp_path / "data").exists()


def _run_demo(api_url: str, key: str, policy: str) -> str:
    # The test model's groups have reward variance ~1 time in 9 (at 48 tokens): 80 traces
    # (~64 train) leave a run nothing to train on with probability ~0.1%.
    result = CliRunner().invoke(cli, ["demo", "--url", api_url, "--key", key, "--policy", policy,
                                      "--traces", "80", "--group-size", "4",
                                      "--max-tokens", "48"])
    assert result.exit_code == 0, result.output
    return result.output


def test_demo_creates_the_named_policy_with_the_default_gate_and_says_so(
    cli_settings, api_url, make_key: Callable[..., str]
):
    key = make_key(f"t-{uuid.uuid4().hex[:10]}", "ingest,read,admin")
    name = f"clin-{uuid.uuid4().hex[:8]}"
    out = _run_demo(api_url, key, name)
    assert f"creating policy {name} with the default gate" in out
    assert "correct must improve significantly" in out
    assert f"candidate {name}-v1:" in out
    policy = httpx.get(f"{api_url}/v1/policies/{name}",
                       headers={"Authorization": f"Bearer {key}"}).json()
    assert policy["gate"]["primary_metric"] == "correct"
    assert policy["gate"]["min_parse_rate"] is None


def test_demo_uses_an_existing_policy_as_configured(
    cli_settings, api_url, make_key: Callable[..., str]
):
    key = make_key(f"t-{uuid.uuid4().hex[:10]}", "ingest,read,admin")
    name = f"clin-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{api_url}/v1/policies", headers={"Authorization": f"Bearer {key}"},
                   json={"name": name, "group_size": 4, "sampling": {"max_tokens": 48},
                         "gate": {"min_eval_n": 5}})
    assert r.status_code == 201, r.text
    out = _run_demo(api_url, key, name)
    assert f"using policy {name} as configured: G=4, max_tokens 48" in out
    assert "n ≥ 5" in out
    assert "creating policy" not in out
    assert f"candidate {name}-v1:" in out


def test_a_key_without_the_ingest_scope_is_refused_before_the_model(
    tmp_path, pg_url, api_url, make_key: Callable[..., str]
):
    key = make_key(f"t-{uuid.uuid4().hex[:10]}", "read")
    proc = demo_process(tmp_path, pg_url, "--url", api_url, "--key", key)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert out.splitlines() == [
        "demo refused: the key may not ingest traces (403): create one with "
        "`tracelearn keys create --tenant demo --scopes ingest,read,admin`"
    ]
    assert not (tmp_path / "data").exists()


def test_an_invalid_policy_name_is_refused_before_anything_else(cli_settings):
    result = CliRunner().invoke(cli, ["demo", "--policy", "Clinical Trial"])
    assert result.exit_code == 2, result.output
    assert "'Clinical Trial' is not a policy name" in result.output
    assert not cli_settings.exists()
