from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ProxyMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=200_000)


class ChatCompletionIn(BaseModel):
    """The subset of OpenAI's chat completion request the proxy honours; other fields that
    clients send by habit (``top_p``, ``presence_penalty``, …) are accepted and ignored, because
    training needs the untruncated sampling distribution."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=64, description="The policy name.")
    messages: list[ProxyMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, Any] | None = Field(
        default=None, description="Stored as the trace's metadata (e.g. your request id)."
    )


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionOut(BaseModel):
    id: str = Field(description="Also the recorded trace's external_id: send feedback with it.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The immutable name of the snapshot that answered.")
    choices: list[Choice]
    usage: Usage
