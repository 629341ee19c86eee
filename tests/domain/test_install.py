"""First start: the bundled model comes from the package when it matches the recipe, and the
reason to build instead is said when it does not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.install import ensure_base_model, model_build_reason
from app.settings import Settings
from workers.clinical import task
from workers.learner import bundled


def settings_in(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", model_cache=tmp_path / "cache",
                    environment="test", **kw)


def test_first_start_copies_the_shipped_model_and_builds_nothing(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    assert model_build_reason(settings) is None
    t0 = time.monotonic()
    path = ensure_base_model(settings)
    assert time.monotonic() - t0 < 5
    assert path == settings.models_dir / "tiny"
    assert bundled.file_digests(path) == bundled.read_manifest()["files"]
    assert not settings.model_cache.exists()
    assert ensure_base_model(settings) == path  # the second start takes it as it is


def test_a_changed_recipe_is_the_reason_to_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task, "corpus_digest", lambda: "another-corpus")
    reason = model_build_reason(settings_in(tmp_path))
    assert reason is not None
    assert reason.startswith(
        f"the shipped model was built by recipe {bundled.read_manifest()['cache_key']}")


def test_a_configured_base_model_needs_no_build(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, base_model_dir=tmp_path / "mine")
    assert model_build_reason(settings) is None
    assert ensure_base_model(settings) == tmp_path / "mine"
