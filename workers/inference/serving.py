"""The serving engine: where a promoted adapter is hot-loaded and where the logging proxy sends
requests.

``ServingEngine`` is the one interface promotion, rollback and the proxy use. Two implementations:

* ``LocalServingEngine`` — the embedded default: the local transformers backend in this process.
* ``VllmServingEngine`` — a vLLM OpenAI server over HTTP (runtime LoRA loading enabled with
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``).

The base model (snapshot v0) is addressed with ``model=None``: it has no adapter and needs no load.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from workers.inference.base import AdapterRef, SamplingParams, UnknownAdapterError
from workers.inference.chat import (
    encode_prompt,
    split_tools,
    template_supports_tools,
    tool_choice_of,
    tools_block,
)
from workers.inference.detokenizer import IncrementalDecoder
from workers.inference.tool_calls import ParsedCall
from workers.inference.vllm_http import VllmUnavailable


class EngineError(RuntimeError):
    """The engine refused or failed an operation (load error, bad response)."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached at all (down, refusing connections, timing out)."""


@dataclass(frozen=True)
class EngineCompletion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class EngineChunk:
    """A piece of a completion as it is generated, with the token counts so far, so whoever
    stops reading early (at a stop string, or when the client goes away) still knows them."""

    text: str
    """New text since the previous chunk; never half a character."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far (the stop token included, as ``EngineCompletion`` counts)."""
    finish_reason: str | None = None
    """On the last chunk only: "stop" (the model ended) or "length" (``max_tokens``)."""
    tool_calls: tuple[ParsedCall, ...] = ()
    """On the last chunk: calls the engine split off the text itself (a vLLM server with a
    tool-call parser); otherwise calls stay in the text, for the reader to split."""


@runtime_checkable
class ServingEngine(Protocol):
    """What promotion and the proxy need from whatever serves the policy's adapters."""

    def load_adapter(self, name: str, path: str) -> None:
        """Make adapter ``path`` servable under the immutable ``name``; idempotent for the same
        (name, path)."""
        ...

    def unload_adapter(self, name: str) -> None:
        """Forget ``name``; unknown names are ignored."""
        ...

    def list_models(self) -> list[str]:
        """Names the engine answers to right now (adapters included)."""
        ...

    def complete(
        self,
        model: str | None,
        messages: list[dict[str, str]],
        params: SamplingParams,
    ) -> EngineCompletion:
        """One chat completion from adapter ``model`` (None: the base model)."""
        ...

    def stream(
        self,
        model: str | None,
        messages: list[dict[str, str]],
        params: SamplingParams,
    ) -> Iterator[EngineChunk]:
        """The completion as it is generated, ending with a chunk that has the finish reason
        (joined, the texts are what ``complete`` answers). Closing the iterator early ends
        generation."""
        ...


class LocalServingEngine:
    """The in-process engine of the embedded default, on the local transformers backend.

    The backend verifies each adapter's sha256 and merges it into a private copy of the base when
    it is first loaded, so ``load_adapter`` does the full work up front and a request never pays it.
    """

    def __init__(self, base_model_dir: str | Path, backend: Any = None, device: str = "cpu") -> None:
        self.base_model_dir = str(base_model_dir)
        self._backend = backend
        self.device = device
        """Where the model loads when the engine makes its own backend (``LocalBackend``)."""
        self._adapters: dict[str, AdapterRef] = {}
        # transformers models are not safe to drive from two threads at once.
        self.lock = threading.RLock()

    @property
    def backend(self) -> Any:
        if self._backend is None:
            from workers.inference.local import LocalBackend

            with self.lock:
                if self._backend is None:
                    self._backend = LocalBackend(self.base_model_dir, device=self.device)
        return self._backend

    def load_adapter(self, name: str, path: str) -> None:
        ref = AdapterRef(name=name, path=str(path))
        known = self._adapters.get(name)
        if known is not None and known.path != ref.path:
            raise EngineError(f"adapter name {name!r} is already loaded from {known.path}")
        with self.lock:
            try:
                self.backend.model_for(ref)
            except UnknownAdapterError as exc:
                raise EngineError(str(exc)) from exc
            self._adapters[name] = ref

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self._adapters.pop(name, None)

    def list_models(self) -> list[str]:
        return ["base", *self._adapters]

    def _ref(self, model: str | None) -> AdapterRef | None:
        if model is None:
            return None
        ref = self._adapters.get(model)
        if ref is None:
            raise UnknownAdapterError(f"adapter {model!r} is not loaded")
        return ref

    def complete(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> EngineCompletion:
        ref = self._ref(model)
        with self.lock:
            out = self.backend.generate([messages], 1, params, ref)[0][0]
            prompt_tokens = len(encode_prompt(self.backend.tokenizer, messages))
        return EngineCompletion(
            text=out.text,
            finish_reason=out.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(out.token_ids),
        )

    def stream(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> Iterator[EngineChunk]:
        ref = self._ref(model)
        # Held for the whole generation, so the iterator must be read and closed by one thread.
        with self.lock:
            backend = self.backend
            prompt_tokens = len(encode_prompt(backend.tokenizer, messages))
            eos = backend.tokenizer.eos_token_id
            decoder = IncrementalDecoder(backend.tokenizer)
            count, last = 0, None
            for last in backend.stream(messages, params, ref):
                count += 1
                if last == eos:
                    break
                # A chunk per token, text or not: the reader may stop between any two tokens.
                yield EngineChunk(decoder.add(last), prompt_tokens, count)
            cut = last != eos
            yield EngineChunk(decoder.flush(cut=cut), prompt_tokens, count,
                              "length" if cut else "stop")


class VllmServingEngine:
    """A vLLM OpenAI-compatible server. Adapter management goes through the rollout workers'
    ``VllmHttpBackend`` (one client of the server's LoRA API); chat requests go to
    ``/v1/chat/completions`` so the server applies the chat template and can stream."""

    def __init__(
        self, backend: Any, timeout_s: float = 120.0, tool_call_parser: str | None = None
    ) -> None:
        self.backend = backend
        self.base_url: str = backend.base_url
        self.timeout_s = timeout_s
        self.tool_call_parser = tool_call_parser
        """The server's ``--tool-call-parser`` (started with ``--enable-auto-tool-choice``),
        None when it has none."""

    @staticmethod
    def _translate(exc: Exception) -> EngineError:
        if isinstance(exc, VllmUnavailable):
            return EngineUnavailable(str(exc))
        return EngineError(str(exc))

    def load_adapter(self, name: str, path: str) -> None:
        try:
            # Our canary runs through the chat endpoint below; the backend's own is redundant.
            self.backend.load_adapter(AdapterRef(name=name, path=str(path)), canary=False)
        except (RuntimeError, UnknownAdapterError) as exc:
            raise self._translate(exc) from exc

    def unload_adapter(self, name: str) -> None:
        try:
            self.backend.unload_adapter(name)
        except RuntimeError as exc:
            raise self._translate(exc) from exc

    def list_models(self) -> list[str]:
        try:
            return list(self.backend.list_models())
        except RuntimeError as exc:
            raise self._translate(exc) from exc

    def _body(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> dict[str, Any]:
        try:
            base = self.backend.base_model
        except RuntimeError as exc:
            raise self._translate(exc) from exc
        # The server applies the chat template, so tools go as its ``tools`` when the template
        # renders them, else as the same system block ``encode_prompt`` uses.
        chat, tools = split_tools(messages)
        if tools and not template_supports_tools(self.backend.tokenizer):
            chat = [tools_block(tools), *chat]
        body: dict[str, Any] = {
            "model": model or base,
            "messages": chat,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if tools and template_supports_tools(self.backend.tokenizer):
            body["tools"] = tools
            # A server with a tool-call parser splits the calls off and honours the client's
            # choice. One without refuses "auto" (vLLM's default when tools are sent), so it is
            # told "none": the template still shows the tools, and the calls come back as text
            # for the proxy to split.
            choice = tool_choice_of(messages)
            if self.tool_call_parser is None:
                body["tool_choice"] = "none"
            elif choice is not None:
                body["tool_choice"] = choice
        return body

    def complete(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> EngineCompletion:
        body = self._body(model, messages, params)
        try:
            r = httpx.post(
                self.base_url + "/v1/chat/completions", json=body, timeout=self.timeout_s
            )
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"vLLM at {self.base_url} is unreachable: {exc}") from exc
        if r.status_code == 404:
            raise UnknownAdapterError(f"vLLM does not know {model!r}")
        if r.status_code >= 400:
            raise EngineError(f"vLLM completion failed: {r.status_code} {r.text[:300]}")
        data = r.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return EngineCompletion(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )

    def stream(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> Iterator[EngineChunk]:
        # The server's own stream, passed on chunk by chunk; usage on every chunk (vLLM's
        # ``continuous_usage_stats``) so a reader that stops early still has the counts.
        body = self._body(model, messages, params) | {
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        prompt_tokens = completion_tokens = 0
        finish: str | None = None
        calls = ToolCallDeltas()
        try:
            with httpx.stream(
                "POST", self.base_url + "/v1/chat/completions", json=body, timeout=self.timeout_s
            ) as r:
                if r.status_code == 404:
                    raise UnknownAdapterError(f"vLLM does not know {model!r}")
                if r.status_code >= 400:
                    r.read()
                    raise EngineError(f"vLLM completion failed: {r.status_code} {r.text[:300]}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        raise EngineError(f"vLLM stream failed: {str(data['error'])[:300]}")
                    usage = data.get("usage") or {}
                    prompt_tokens = int(usage.get("prompt_tokens", prompt_tokens))
                    completion_tokens = int(usage.get("completion_tokens", completion_tokens))
                    for choice in data.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        delta = choice.get("delta") or {}
                        calls.add(delta.get("tool_calls") or [])
                        if delta.get("content"):
                            yield EngineChunk(str(delta["content"]), prompt_tokens,
                                              completion_tokens)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"vLLM at {self.base_url} is unreachable: {exc}") from exc
        yield EngineChunk("", prompt_tokens, completion_tokens,
                          "length" if finish == "length" else "stop", calls.complete())


class ToolCallDeltas:
    """Tool calls streamed in OpenAI's delta shape (by ``index``: the name once, the arguments
    in fragments), put back together."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[str, str]] = {}

    def add(self, deltas: list[dict[str, Any]]) -> None:
        for d in deltas:
            index = int(d.get("index", len(self._calls)))
            name, arguments = self._calls.get(index, ("", ""))
            fn = d.get("function") or {}
            self._calls[index] = (name + (fn.get("name") or ""),
                                  arguments + (fn.get("arguments") or ""))

    def complete(self) -> tuple[ParsedCall, ...]:
        return tuple(ParsedCall(name, arguments or "{}")
                     for name, arguments in (self._calls[i] for i in sorted(self._calls)))


# --- which engine serves a policy ----------------------------------------------------------------

EngineFactory = Callable[[str], ServingEngine]
"""base model path → engine; the settings decide which implementation."""
