"""First start: the schema at head and a base model on disk — the configured one, or the bundled
tiny model: copied from the package (``workers/learner/bundled-tiny``) when it was built by the
current recipe, otherwise built deterministically once and cached (``model_cache``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from app import migrate
from app.settings import Settings
from workers.learner import bundled
from workers.learner.recipe import BootstrapConfig

StageProgress = Callable[[str, int, int], None]
"""progress(stage, done, total) of the model build."""


def _bundled_target(settings: Settings) -> Path:
    return settings.models_dir / "tiny"


def model_build_reason(settings: Settings) -> str | None:
    """Why the first start has to build the bundled model (the slow part); None when it need not:
    a base model is configured, already on disk, or shipped for the current recipe."""
    if settings.base_model_dir is not None or (_bundled_target(settings) / "config.json").is_file():
        return None
    return bundled.unusable_reason(BootstrapConfig())


def ensure_base_model(settings: Settings, progress: StageProgress | None = None) -> Path:
    """The configured base model, or the bundled tiny model (copied from the package, or built
    once and cached when the shipped one does not match the recipe)."""
    if settings.base_model_dir is not None:
        return settings.base_model_dir
    target = _bundled_target(settings)
    if (target / "config.json").is_file():
        return target
    if bundled.unusable_reason(BootstrapConfig()) is None:
        return bundled.install(target)
    # Imported only when a build is due: it loads transformers, which the API process otherwise
    # never needs (its memory stays small).
    from workers.learner.bootstrap import bootstrap_model

    return bootstrap_model(out=target, cache_dir=settings.model_cache, progress=progress)


def prepare(settings: Settings, progress: StageProgress | None = None) -> Path:
    """Create the data directory, migrate the database, and return the base model's directory."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    return ensure_base_model(settings, progress)
