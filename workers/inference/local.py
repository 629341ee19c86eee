"""Local inference with transformers (+ peft adapters): batched sampling with a KV cache.

The sampling loop is written out instead of calling ``model.generate`` so that the reported
per-token log-probs are exactly log softmax(logits / T) of the distribution each token was drawn
from — the behaviour log-probs OAPL uses as log π_ref.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from workers.inference.base import AdapterRef, Completion, SamplingParams, UnknownAdapterError
from workers.inference.chat import check_token_ids, embedding_rows, encode_prompt
from workers.inference.shared_prompt import (
    cache_keyword,
    cache_of,
    distinct_prompts,
    left_padded,
    prefill,
)


def pick_device(choice: str) -> torch.device:
    """``choice`` as a torch device; ``auto``: the first GPU when torch sees one, else the CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= gpus:
            raise ValueError(f"device {choice!r} was asked for, but torch sees "
                             f"{gpus or 'no'} GPU{'' if gpus == 1 else 's'} on this machine")
    return device


class LocalBackend:
    """``InferenceBackend`` on local transformers.

    ``base_path``: HF model directory (e.g. from ``tracelearn model bootstrap``). Adapters are
    verified (sha256 against their manifest), merged into a copy of the base and cached by name
    (``max_cached_adapters`` most recent); names are immutable, so a cached name is never stale.
    ``device``: a torch device (``cpu``, ``cuda``, ``cuda:1``) or ``auto``, a GPU when torch sees
    one; a GPU asked for and absent raises ``ValueError`` before anything loads.
    """

    def __init__(
        self,
        base_path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 256,
        max_cached_adapters: int = 4,
    ) -> None:
        self.base_path = str(base_path)
        self.device = pick_device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_cached_adapters = max_cached_adapters
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        self.base = self._load_base()
        self._adapters: OrderedDict[str, PreTrainedModel] = OrderedDict()
        self._adapter_paths: dict[str, str] = {}

    def _load_base(self) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=self.dtype)
        model.to(self.device)  # type: ignore[arg-type]  # transformers stub quirk
        return model.eval()

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: Any, **kw: Any) -> LocalBackend:
        """Wrap an in-memory model (tests, benchmarks); adapters are then not available."""
        self = cls.__new__(cls)
        self.base_path = "<in-memory>"
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_batch_size = kw.get("max_batch_size", 256)
        self.max_cached_adapters = 0
        self.tokenizer = tokenizer
        self.base = model.eval()
        self._adapters = OrderedDict()
        self._adapter_paths = {}
        return self

    def model_for(self, adapter: AdapterRef | None) -> PreTrainedModel:
        if adapter is None:
            return self.base
        if adapter.name in self._adapters:
            if self._adapter_paths[adapter.name] != adapter.path:
                raise UnknownAdapterError(
                    f"adapter name {adapter.name!r} already loaded from another path"
                )
            self._adapters.move_to_end(adapter.name)
            return self._adapters[adapter.name]
        if self.base_path == "<in-memory>":
            raise UnknownAdapterError("in-memory backend cannot load adapters")
        from peft import PeftModel

        from workers.learner.adapters import load_verified

        if not Path(adapter.path).is_dir():
            raise UnknownAdapterError(f"adapter {adapter.name!r}: no directory {adapter.path}")
        load_verified(adapter.path)
        # Merging into a private copy makes sampling as fast as the base model.
        peft_model = PeftModel.from_pretrained(self._load_base(), adapter.path)
        merged = peft_model.merge_and_unload().eval()
        self._adapters[adapter.name] = merged
        self._adapter_paths[adapter.name] = adapter.path
        while len(self._adapters) > self.max_cached_adapters:
            evicted, _ = self._adapters.popitem(last=False)
            del self._adapter_paths[evicted]
        return merged

    def generate(
        self,
        prompts: list[list[dict[str, str]]],
        n: int,
        params: SamplingParams,
        adapter: AdapterRef | None = None,
    ) -> list[list[Completion]]:
        model = self.model_for(adapter)
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        check_token_ids(prompt_ids, embedding_rows(model))
        flat = [ids for ids in prompt_ids for _ in range(n)]
        gen = torch.Generator(device="cpu")
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        results: list[Completion] = []
        for start in range(0, len(flat), self.max_batch_size):
            chunk = flat[start : start + self.max_batch_size]
            results.extend(self._sample(model, chunk, params, gen))
        return [results[i * n : (i + 1) * n] for i in range(len(prompts))]

    def stream(
        self,
        prompt: list[dict[str, str]],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
    ) -> Iterator[int]:
        """One completion's token ids as they are sampled (the stop token last, when sampled):
        the same draws as ``generate`` with the same seed. Closing the iterator ends
        generation."""
        model = self.model_for(adapter)
        prompt_ids = encode_prompt(self.tokenizer, prompt)
        check_token_ids([prompt_ids], embedding_rows(model))
        gen = torch.Generator(device="cpu")
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        for tok, _ in self._steps(model, [prompt_ids], params, gen):
            yield int(tok[0])

    def _sample(
        self,
        model: PreTrainedModel,
        prompts: list[list[int]],
        params: SamplingParams,
        gen: torch.Generator,
    ) -> list[Completion]:
        eos = self.tokenizer.eos_token_id
        b = len(prompts)
        tokens = torch.zeros((b, params.max_tokens), dtype=torch.long)
        logps = torch.zeros((b, params.max_tokens), dtype=torch.float32)
        lengths = torch.full((b,), params.max_tokens, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        for t, (tok, logp) in enumerate(self._steps(model, prompts, params, gen)):
            tokens[:, t] = tok
            logps[:, t] = logp
            newly = (tok == eos) & ~done
            lengths[newly] = t + 1
            done |= newly

        completions = []
        for i in range(b):
            k = int(lengths[i])
            ids = tokens[i, :k].tolist()
            stopped = bool(done[i])
            text_ids = ids[:-1] if stopped else ids
            completions.append(
                Completion(
                    text=str(self.tokenizer.decode(text_ids, skip_special_tokens=True)),
                    token_ids=ids,
                    logprobs=logps[i, :k].tolist(),
                    finish_reason="stop" if stopped else "length",
                )
            )
        return completions

    @torch.no_grad()
    def _steps(
        self,
        model: PreTrainedModel,
        prompts: list[list[int]],
        params: SamplingParams,
        gen: torch.Generator,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per step, each sequence's sampled token and its behaviour log-prob (on the CPU),
        until every sequence has sampled the stop token or ``max_tokens`` steps are done."""
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        b = len(prompts)
        # A group's n samples continue one prompt: it runs once and they share its cache.
        distinct, rows = distinct_prompts(prompts)
        ids, mask = left_padded(distinct, pad)
        state = prefill(model, ids.to(self.device), mask.to(self.device))
        if len(distinct) < b:
            state = state.for_rows(torch.tensor(rows, device=self.device))
        past, logits, attn = state.cache, state.last_logits, state.attention_mask
        next_pos = state.next_position
        cache_arg = cache_keyword(model)

        done = torch.zeros(b, dtype=torch.bool)
        # The rows still in the model's batch: finished ones leave it (a group's answers end at
        # different lengths) once enough have finished that a copy of the cache pays for itself.
        active = torch.arange(b)
        for t in range(params.max_tokens):
            logits = logits.float()
            if params.temperature == 0:
                logp = torch.log_softmax(logits, dim=-1)
                tok = logp.argmax(dim=-1)
            else:
                logp = torch.log_softmax(logits / params.temperature, dim=-1)
                tok = gumbel_max(logp, gen)
            # rows that left the batch report the stop token again; callers read up to the first
            all_tok = torch.full((b,), eos, dtype=torch.long)
            all_tok[active] = tok.cpu()
            all_logp = torch.zeros(b, dtype=torch.float32)
            all_logp[active] = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1).cpu()
            yield all_tok, all_logp
            done |= all_tok == eos
            if bool(done.all()) or t == params.max_tokens - 1:
                break
            going = ~done[active]
            if int(going.sum()) <= _COMPACT_AT * len(active):
                keep = going.nonzero().squeeze(-1)
                active, keep = active[keep], keep.to(self.device)
                past.batch_select_indices(keep)
                attn, next_pos, tok = attn[keep], next_pos[keep], tok[keep]
            attn = torch.cat(
                [attn, torch.ones((len(active), 1), dtype=attn.dtype, device=self.device)], 1
            )
            out = model(
                input_ids=tok.unsqueeze(-1),
                attention_mask=attn,
                position_ids=next_pos,
                use_cache=True,
                **{cache_arg: past},
            )
            past, logits = cache_of(out), out.logits[:, -1, :]
            next_pos = next_pos + 1


_COMPACT_AT = 0.75
"""Finished rows leave the decoding batch when at most this share of it is still going."""


def gumbel_max(logp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row from softmax(``logp``): argmax of logp + Gumbel noise, which is exactly
    a categorical draw (a zero-probability token, logp = −inf, is never drawn). The noise comes
    from ``gen`` on the CPU, so a seed gives the same draws on every device; it replaces
    ``torch.multinomial``, which took a third of a CPU decoding step."""
    u = torch.rand(logp.shape, generator=gen, dtype=torch.float32).to(logp.device)
    return (logp - torch.log(-torch.log(u))).argmax(dim=-1)
