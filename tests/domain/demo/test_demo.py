"""`tracelearn demo` end to end on the embedded default (SQLite, in-process everything), shrunk
to a few traces and a very small model so it fits the default suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import engines
from app.cli.serve import local_api
from app.db import set_database
from app.settings import Settings, get_settings, set_settings
from tests.support.seeding import build_model


@pytest.fixture
def demo_settings(tmp_path: Path):
    model = build_model(get_settings().model_cache)
    settings = Settings(data_dir=tmp_path / "data", base_model_dir=model, environment="test",
                        task_always_eager=True, log_level="WARNING")
    yield settings
    set_database(None)
    set_settings(None)
    engines.reset()


def test_demo_posts_regenerates_trains_evaluates_and_gates_a_candidate(demo_settings):
    from app.demo.service import run_demo

    stages: list[str] = []
    result = run_demo(demo_settings, lambda stage, done, total: stages.append(stage), serve=local_api,
                      n_traces=30, group_size=4, max_tokens=48, eval_k=1)
    assert result.error is None, result.error
    assert result.traces_posted == 30 and result.heldout > 0
    assert result.groups > 0 and result.run_id is not None
    assert result.served_name == "clinical-v1"
    # The gate decides; either way the decision and the numbers are recorded.
    assert result.status in ("awaiting_approval", "rejected")
    assert set(result.before) >= {"correct", "parse_rate", "mean_reward", "pass@1"}
    assert set(result.after) == set(result.before)
    assert "mcnemar" in result.p_values
    for stage in ("model", "ingest", "regenerate", "grade", "train", "evaluate", "done"):
        assert stage in stages
    assert result.dashboard_url.endswith(f"/dashboard/snapshots/{result.snapshot_id}")


def test_demo_command_prints_before_and_after_and_where_to_review(demo_settings):
    from typer.testing import CliRunner

    from app.cli import cli

    set_settings(demo_settings)
    result = CliRunner().invoke(cli, ["demo", "--traces", "30", "--group-size", "4",
                                      "--max-tokens", "48"])
    out = result.output
    assert result.exit_code == 0, out
    for stage in ("ingest", "regenerate", "grade", "train", "evaluate"):
        assert stage in out
    assert "champion (before)" in out and "candidate (after)" in out and "parse_rate" in out
    assert "creating policy clinical with the default gate" in out
    assert "candidate clinical-v1:" in out
    assert "awaiting_approval" in out or "rejected" in out
    assert "/dashboard/snapshots/" in out


def test_demo_command_refuses_too_few_traces_before_doing_anything(demo_settings):
    from typer.testing import CliRunner

    from app.cli import cli

    set_settings(demo_settings)
    result = CliRunner().invoke(cli, ["demo", "--traces", "3"])
    assert result.exit_code == 2
    assert not (demo_settings.data_dir / "tracelearn.db").exists()
