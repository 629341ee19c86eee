"""`tracelearn import` / `tracelearn export` as a person runs them: a JSON summary on stdout, the
progress bar on stderr, a second import adding nothing, a non-zero exit when lines are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


def tracelearn(pg_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TRACELEARN_DATABASE_URL": pg_url, "TRACELEARN_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def summary(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_twice_then_export(pg_url, tenant, policy_name, tmp_path: Path):
    lines = [{"messages": [{"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    source = tmp_path / "ft.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines) + "oops\n")
    args = ("import", str(source), "--format", "openai-jsonl", "--tenant", tenant,
            "--policy", policy_name)

    first = tracelearn(pg_url, *args)
    assert first.returncode == 1, first.stderr  # the last line is refused
    assert summary(first) == {"records": 3, "created": 3, "already_stored": 0, "skipped": 0,
                              "rejected": 1}
    assert "line 4: not JSON" in first.stderr
    second = summary(tracelearn(pg_url, *args))
    assert (second["created"], second["already_stored"]) == (0, 3)

    out = tmp_path / "out.jsonl"
    exported = tracelearn(pg_url, "export", str(out), "--format", "openai-jsonl",
                          "--tenant", tenant, "--bare")
    assert exported.returncode == 0, exported.stderr
    assert summary(exported)["traces"] == 3
    assert sorted(json.loads(x)["messages"][-1]["content"] for x in out.read_text().splitlines()
                  ) == ["a0", "a1", "a2"]
