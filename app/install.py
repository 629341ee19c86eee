"""First start: the schema at head and a base model on disk — the configured one, or the bundled
tiny model, built deterministically once and cached (``model_cache``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from app import migrate
from app.settings import Settings

StepProgress = Callable[[int, int], None]
"""progress(done, total) of the model build."""


def model_build_needed(settings: Settings) -> bool:
    """Whether the first start still has to build the bundled model (the slow part)."""
    return settings.base_model_dir is None and not (
        settings.models_dir / "tiny" / "config.json"
    ).is_file()


def ensure_base_model(settings: Settings, progress: StepProgress | None = None) -> Path:
    """The configured base model, or the bundled tiny model built (once, cached) on first use."""
    if settings.base_model_dir is not None:
        return settings.base_model_dir
    target = settings.models_dir / "tiny"
    if (target / "config.json").is_file():
        return target
    # Imported only when a build is due: it loads torch, which the API process otherwise never
    # needs (its memory stays small).
    from workers.learner.bootstrap import bootstrap_model

    report = progress or (lambda done, total: None)
    return bootstrap_model(out=target, cache_dir=settings.model_cache,
                           progress=lambda done, total, loss: report(done, total))


def prepare(settings: Settings, progress: StepProgress | None = None) -> Path:
    """Create the data directory, migrate the database, and return the base model's directory."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    return ensure_base_model(settings, progress)
