"""What every inference backend (local transformers, vLLM over HTTP, in-process vLLM) provides.

Training data needs the exact behaviour distribution: ``SamplingParams`` deliberately has no top-p
or top-k, and every ``Completion`` carries its token ids and the per-token log-probs under the
distribution that was actually sampled (temperature applied), which OAPL uses as log π_ref.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    """Upper bound on generated tokens per completion (the stop token counts)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (log-probs are then reported at temperature 1)."""
    seed: int | None = None
    """Seed for the sampler's RNG; None draws fresh randomness."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter by immutable name (e.g. ``clinical-pfs-v3``) and directory."""

    name: str
    path: str


@dataclass(frozen=True)
class Completion:
    text: str
    """Decoded completion without the stop token."""
    token_ids: list[int] = field(default_factory=list)
    """Sampled token ids, including the stop token when the completion stopped by itself."""
    logprobs: list[float] = field(default_factory=list)
    """Behaviour log-prob of each sampled token, aligned with ``token_ids``."""
    finish_reason: str = "stop"
    """"stop" (stop token sampled) or "length" (hit ``max_tokens``)."""

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))


class UnknownAdapterError(LookupError):
    """The backend cannot find or load the requested adapter."""


@runtime_checkable
class InferenceBackend(Protocol):
    def generate(
        self,
        prompts: list[list[dict[str, str]]],
        n: int,
        params: SamplingParams,
        adapter: AdapterRef | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per chat prompt, in prompt order: result[i][j] is prompt i's j-th."""
        ...
