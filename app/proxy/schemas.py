"""OpenAI's chat-completion and model shapes, as the proxy speaks them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.traces.schemas import ChatMessage, ToolCall, ToolDefinition


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class ChatCompletionIn(BaseModel):
    """OpenAI's chat completion request. What the proxy cannot honour (``n`` > 1, log-probs,
    image input) is refused with an ``invalid_request_error`` naming the parameter; fields
    clients send by habit that would truncate the sampling distribution (``top_p``,
    ``presence_penalty``, …) are accepted and ignored, because training needs the untruncated
    distribution."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=64, description="The policy name.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    tools: list[ToolDefinition] | None = Field(
        default=None, max_length=128,
        description="Shown to the model and stored with the trace; calls the model writes to "
        "them come back as `tool_calls` (`finish_reason: tool_calls`).",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description='`"none"` leaves the answer as text, even if it looks like a '
        "call; other values are stored (and passed to a vLLM server with a tool-call parser).",
    )
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int | None = Field(default=None, description="Only 1 is supported.")
    logprobs: bool | None = Field(default=None, description="Not supported: only false.")
    top_logprobs: int | None = Field(default=None, description="Not supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256, description="Stored as `user_id`.")
    metadata: dict[str, Any] | None = Field(
        default=None, description="Stored as the trace's metadata (e.g. your request id)."
    )


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: str
    logprobs: None = None


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
    system_fingerprint: str | None = None


class ModelOut(BaseModel):
    """A policy, as OpenAI lists a model."""

    id: str = Field(description="The policy name: what a client passes as `model`.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    serving_snapshot: str | None = Field(
        description="The snapshot that answers right now, e.g. `clinical-v3`."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
