"""Inference backends: sample completions with token ids and behaviour log-probs."""

from workers.inference.base import (
    AdapterRef,
    Completion,
    InferenceBackend,
    SamplingParams,
    UnknownAdapterError,
)
from workers.inference.chat import encode_prompt

__all__ = [
    "AdapterRef",
    "Completion",
    "InferenceBackend",
    "SamplingParams",
    "UnknownAdapterError",
    "encode_prompt",
]
