"""The one registry of inference machinery: which sampling backend and which serving engine the
settings select, built once per process and shared.

Rollouts, evaluation, promotion and the proxy all ask here; the engines themselves
(``workers.inference``) take plain values and know nothing of settings.
"""

from __future__ import annotations

import threading
from typing import Any

from app.models import Snapshot
from app.settings import Settings
from workers.inference.base import AdapterRef, Completion, InferenceBackend, SamplingParams
from workers.inference.serving import LocalServingEngine, ServingEngine, VllmServingEngine
from workers.inference.vllm_http import VllmHttpBackend

_lock = threading.Lock()
_backends: dict[tuple[str, str], InferenceBackend] = {}
_engines: dict[tuple[str, str], ServingEngine] = {}
_backend_override: InferenceBackend | None = None
_engine_override: ServingEngine | None = None


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
    global _backend_override
    _backend_override = backend


def set_engine_override(engine: ServingEngine | None) -> None:
    """Make every policy serve through ``engine`` (tests, the demo); None returns to the settings."""
    global _engine_override
    _engine_override = engine


def _vllm_http(settings: Settings, base_model: str) -> VllmHttpBackend:
    return VllmHttpBackend(settings.vllm_url, base_model, timeout_s=settings.vllm_timeout_s)


def engine_for(settings: Settings, base_model: str) -> ServingEngine:
    """The process-wide engine that serves policies on ``base_model``.

    Only a vLLM *server* can hot-load for other processes; the in-process backends (local
    transformers, in-process vLLM for rollouts) serve through the local engine.
    """
    if _engine_override is not None:
        return _engine_override
    kind = "vllm_http" if settings.inference_backend == "vllm_http" else "local"
    key = (kind, base_model if kind == "local" else settings.vllm_url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if kind == "local":
                engine = LocalServingEngine(base_model, device=settings.local_device)
            else:
                engine = VllmServingEngine(_vllm_http(settings, base_model),
                                           timeout_s=settings.vllm_timeout_s,
                                           tool_call_parser=settings.vllm_tool_call_parser)
            _engines[key] = engine
        return engine


def backend_for(settings: Settings, base_model: str) -> InferenceBackend:
    """The process-wide sampling backend for ``base_model``: the vLLM server, an in-process vLLM,
    or the in-process transformers model — shared with the local serving engine, so a process
    holds one copy of the weights."""
    if _backend_override is not None:
        return _backend_override
    kind = settings.inference_backend
    key = (kind, base_model if kind != "vllm_http" else settings.vllm_url)
    with _lock:
        backend = _backends.get(key)
    if backend is not None:
        return backend
    if kind == "vllm_http":
        backend = _vllm_http(settings, base_model)
    elif kind == "vllm_engine":
        # Imported here: vLLM is an optional extra, absent from most installs.
        from workers.inference.vllm_engine import VllmEngineBackend

        backend = VllmEngineBackend(base_model)
    else:
        engine = engine_for(settings, base_model)
        if isinstance(engine, LocalServingEngine):
            backend = LockedBackend(engine.backend, engine.lock)
        else:
            # Imported here: torch + transformers take seconds, and only this branch needs them.
            from workers.inference.local import LocalBackend

            backend = LockedBackend(LocalBackend(base_model, device=settings.local_device),
                                    threading.Lock())
    with _lock:
        return _backends.setdefault(key, backend)


def reset() -> None:
    """Drop the cached backends and engines (tests switching models)."""
    with _lock:
        _backends.clear()
        _engines.clear()


def adapter_for(snapshot: Snapshot) -> AdapterRef | None:
    """A snapshot's adapter under its immutable served name; None for v0 (the bare base)."""
    if snapshot.adapter_path is None:
        return None
    return AdapterRef(name=snapshot.served_name, path=snapshot.adapter_path)
