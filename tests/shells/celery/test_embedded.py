"""`tracelearn up`'s workers: real Celery children on the no-server SQLite broker."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from app import migrate
from app.cli.processes import start_embedded_workers
from app.db import Database, session_scope, set_database
from app.models import Job, JobStatus
from app.rollouts.service import plan_regeneration
from app.settings import Settings, set_settings
from tests.support.pipeline import policy_row, seed_policy, wait_until
from workers.learner.allocator import allocator_in_use


def test_embedded_workers_run_the_pipeline_on_the_sqlite_broker(
    tmp_path: Path, model_dir: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", environment="test", log_level="WARNING")
    assert settings.resolved_broker_url.startswith("sqla+sqlite:///")
    migrate.upgrade(settings.resolved_database_url)
    set_settings(settings)
    set_database(Database(settings))
    handle = start_embedded_workers(settings)
    try:
        name, _ = seed_policy(settings, model_dir, n_traces=2, group_size=2, max_tokens=12)
        with session_scope() as s:
            (job,) = plan_regeneration(s, policy_row(name))

        def finished() -> list[JobStatus] | None:
            with session_scope() as s:
                statuses = list(s.scalars(select(Job.status).where(Job.id >= job.id)))
            return statuses if statuses == [JobStatus.succeeded] * 2 else None

        wait_until(finished, timeout=240, every=0.5)
        assert all(handle.alive().values())
        # Only the process that trains starts with the learner's allocator.
        allocators = {name: allocator_in_use(Path(f"/proc/{p.pid}/maps"))
                      for name, p in handle.processes.items()}
        assert allocators == {"train": "jemalloc", "worker": "system", "beat": "system"}
    finally:
        handle.stop()
        set_database(None)
        set_settings(None)
    assert not any(handle.alive().values())
