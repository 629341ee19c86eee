"""Fixtures for promotion tests: a real tiny model served by the in-process engine and real
adapters verified by sha256."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.db import Database
from app.engines import set_engine_override
from app.models import SnapshotStatus
from app.settings import get_settings
from tests.support.seeding import add_snapshot, build_model, make_adapter
from workers.inference.serving import LocalServingEngine


@pytest.fixture(scope="session")
def serving_model_dir() -> Path:
    # The bootstrap cache is content-addressed, so sharing the machine's cache across sessions
    # is safe and saves the build (10 s idle, minutes on a busy 2-core box) on every run.
    return build_model(get_settings().model_cache)


@pytest.fixture(scope="session")
def adapter_pool(serving_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real adapters built once; tests copy them so a corrupted one never leaks."""
    root = tmp_path_factory.mktemp("adapters")
    paths = []
    for i in range(3):
        make_adapter(serving_model_dir, root / f"a{i}", seed=i)
        paths.append(root / f"a{i}")
    return paths


@pytest.fixture(scope="session")
def local_engine(serving_model_dir: Path) -> LocalServingEngine:
    return LocalServingEngine(serving_model_dir)


@pytest.fixture
def serving_engine(local_engine: LocalServingEngine) -> Iterator[LocalServingEngine]:
    """The in-process engine, installed for every policy for the test's duration."""
    set_engine_override(local_engine)
    yield local_engine
    set_engine_override(None)


@pytest.fixture
def candidate(
    database: Database,
    policy_name: str,
    adapter_pool: list[Path],
    tmp_path: Path,
    serving_engine: LocalServingEngine,
) -> Callable[..., int]:
    """Make a snapshot of ``policy_name`` with a fresh copy of a real adapter; returns its id."""
    import shutil

    counter = iter(range(1000))

    def _make(status: SnapshotStatus = SnapshotStatus.awaiting_approval, pool: int = 0) -> int:
        dest = tmp_path / "adapters" / f"{policy_name}-{next(counter)}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(adapter_pool[pool], dest)
        return add_snapshot(database, policy_name, dest, status)

    return _make


@pytest.fixture
def candidate_factory(
    database: Database,
    adapter_pool: list[Path],
    tmp_path: Path,
    serving_engine: LocalServingEngine,
) -> Callable[..., int]:
    """Like ``candidate`` but for a policy created by the test itself."""
    import shutil

    def _make(policy: str, pool: int = 0) -> int:
        dest = tmp_path / "adapters" / f"{policy}-{pool}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(adapter_pool[pool], dest)
        return add_snapshot(database, policy, dest)

    return _make
