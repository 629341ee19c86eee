"""Which inference backend a worker samples with, chosen by settings alone and built once."""

from __future__ import annotations

import threading
from typing import Any

from app.models import Snapshot
from app.settings import Settings
from workers.inference.base import AdapterRef, Completion, InferenceBackend, SamplingParams

_backends: dict[tuple[str, str], InferenceBackend] = {}
_lock = threading.Lock()
_override: InferenceBackend | None = None


class LockedBackend:
    """Serialises ``generate`` on a backend shared with another user of the same model."""

    def __init__(self, backend: Any, lock: Any) -> None:
        self.backend = backend
        self.lock = lock

    def generate(
        self,
        prompts: list[list[dict[str, str]]],
        n: int,
        params: SamplingParams,
        adapter: AdapterRef | None = None,
    ) -> list[list[Completion]]:
        with self.lock:
            result: list[list[Completion]] = self.backend.generate(prompts, n, params, adapter)
            return result


def set_backend_override(backend: InferenceBackend | None) -> None:
    """Make every rollout use ``backend`` (tests, benchmarks); None returns to the settings."""
    global _override
    _override = backend


def backend_for(settings: Settings, base_model: str) -> InferenceBackend:
    """The process-wide backend for ``base_model``: the in-process transformers model (shared with
    the embedded serving engine when there is one), the vLLM server, or an in-process vLLM."""
    if _override is not None:
        return _override
    kind = settings.inference_backend
    key = (kind, base_model if kind != "vllm_http" else settings.vllm_url)
    with _lock:
        backend = _backends.get(key)
        if backend is None:
            backend = _build(settings, kind, base_model)
            _backends[key] = backend
        return backend


def _build(settings: Settings, kind: str, base_model: str) -> InferenceBackend:
    if kind == "vllm_http":
        from workers.inference.vllm_http import VllmHttpBackend

        return VllmHttpBackend.from_settings(settings, tokenizer_path=base_model)
    if kind == "vllm_engine":
        from workers.inference.vllm_engine import VllmEngineBackend

        return VllmEngineBackend(base_model)
    try:
        # One copy of the model per process: reuse the embedded serving engine's if it exists.
        from workers.promotion.engine import LocalServingEngine, engine_for

        engine = engine_for(settings, base_model)
        if isinstance(engine, LocalServingEngine):
            return LockedBackend(engine.backend, engine.lock)
    except ImportError:
        pass
    from workers.inference.local import LocalBackend

    return LockedBackend(LocalBackend(base_model), threading.Lock())


def reset_backends() -> None:
    with _lock:
        _backends.clear()


def adapter_for(snapshot: Snapshot) -> AdapterRef | None:
    """A snapshot's adapter under its immutable served name; None for v0 (the bare base)."""
    if snapshot.adapter_path is None:
        return None
    return AdapterRef(name=snapshot.served_name, path=snapshot.adapter_path)
