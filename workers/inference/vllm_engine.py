"""``InferenceBackend`` on an in-process ``vllm.LLM`` (GPU rollout workers; no HTTP hop).

vLLM is imported lazily: the module imports fine without the ``vllm`` extra, and constructing
the backend without it raises a clear ``ImportError``. Prompts are token ids from our chat
template (as in the HTTP backend); adapters are ``LoRARequest``s whose integer ids are assigned
once per name in this process, so a name always maps to the same adapter.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

from workers.inference.base import AdapterRef, Completion, SamplingParams, UnknownAdapterError
from workers.inference.chat import encode_prompt


class VllmEngineBackend:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        dtype: str = "auto",
        **engine_kwargs: Any,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the optional extra
            raise ImportError(
                "the vllm_engine backend needs vLLM: pip install 'tracelearn[vllm]'"
            ) from exc
        # Log-probs of the distribution actually sampled (temperature applied), as OAPL needs.
        engine_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = LLM(
            model=str(model_dir),
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            dtype=dtype,
            **engine_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self._ids: dict[str, tuple[int, str]] = {}
        self._next_id = itertools.count(1)
        self._lock = threading.Lock()

    def _lora(self, adapter: AdapterRef | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        with self._lock:
            known = self._ids.get(adapter.name)
            if known is not None and known[1] != str(adapter.path):
                raise UnknownAdapterError(
                    f"adapter name {adapter.name!r} already used for {known[1]}"
                )
            if known is None:
                if not Path(adapter.path).is_dir():
                    raise UnknownAdapterError(f"adapter {adapter.name!r}: no directory {adapter.path}")
                from workers.learner.adapters import load_verified

                load_verified(adapter.path)
                known = (next(self._next_id), str(adapter.path))
                self._ids[adapter.name] = known
        return LoRARequest(adapter.name, known[0], known[1])

    def generate(
        self,
        prompts: list[list[dict[str, str]]],
        n: int,
        params: SamplingParams,
        adapter: AdapterRef | None = None,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams as VllmSamplingParams

        sp = VllmSamplingParams(
            n=n,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=1.0,
            top_k=-1,
            logprobs=0,
            seed=params.seed,
        )
        inputs = [{"prompt_token_ids": encode_prompt(self.tokenizer, p)} for p in prompts]
        outputs = self.llm.generate(inputs, sp, lora_request=self._lora(adapter), use_tqdm=False)
        result: list[list[Completion]] = []
        eos = self.tokenizer.eos_token_id
        for out in outputs:
            group = []
            for o in out.outputs:
                ids = [int(t) for t in o.token_ids]
                # o.logprobs: one {token_id: Logprob} per step; the sampled token is always in it.
                lps = [float(step[t].logprob) for step, t in zip(o.logprobs or [], ids, strict=True)]
                finish = "length" if o.finish_reason == "length" else "stop"
                # One decode of the ids (not vLLM's incremental text), as the other backends.
                text_ids = ids[:-1] if finish == "stop" and ids and ids[-1] == eos else ids
                group.append(
                    Completion(
                        text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                        token_ids=ids,
                        logprobs=lps,
                        finish_reason=finish,
                    )
                )
            result.append(group)
        return result
