from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from app.models import OutcomeOrigin, OutcomeSource, Split

OutcomeValue = StrictBool | StrictInt | StrictFloat | Annotated[str, Field(max_length=256)]

# ------------------------------------------------------------------ the OpenAI chat format
# Every model below forbids unknown keys and is dumped with ``exclude_unset``, so what a client
# sent is exactly what is stored and what GET returns (explicit nulls included).

Text = Annotated[str, Field(max_length=200_000)]
Short = Annotated[str, Field(max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """Text: the only content a trace can be trained on."""

    type: Literal["text"]
    text: Text


class ImageUrl(_Strict):
    url: str = Field(max_length=8192, description="http(s) URL; inline `data:` URLs are refused.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    """An image stored by reference (its URL); the trace is kept but is not trainable."""

    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Strict):
    data: str
    format: str = Field(max_length=16)


class AudioPart(_Strict):
    """Inline audio: refused with `inline-media-unsupported` (we store media only by reference)."""

    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Strict):
    file_id: Short | None = None
    filename: Short | None = None
    file_data: str | None = None


class FilePart(_Strict):
    """A file by `file_id` is stored by reference (untrainable); inline `file_data` is refused."""

    type: Literal["file"]
    file: FileRef


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: Text


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")
]


class FunctionCall(_Strict):
    name: str = Field(min_length=1, max_length=256)
    arguments: Text = Field(description="JSON text, as the model produced it (kept verbatim).")


class ToolCall(_Strict):
    id: Short
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One OpenAI chat message: string or part-list content, tool calls and tool results."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: Short | None = None
    refusal: Text | None = None

    @model_validator(mode="after")
    def _fits_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry tool_call_id")
        if self.content is None and not (self.role == "assistant" and (
                self.tool_calls or self.refusal is not None)):
            raise ValueError("content is required unless an assistant message has tool_calls")
        if isinstance(self.content, list):
            allowed = _PARTS_BY_ROLE[self.role]
            for part in self.content:
                if part.type not in allowed:
                    raise ValueError(f"a {self.role} message cannot hold {part.type!r} parts")
        return self


_CONTROL_CHAR = re.compile(r"[\x00-\x1f]")
_PARTS_BY_ROLE: dict[str, frozenset[str]] = {
    "system": frozenset({"text"}),
    "developer": frozenset({"text"}),
    "user": frozenset({"text", "image_url", "input_audio", "file"}),
    "assistant": frozenset({"text", "refusal"}),
    "tool": frozenset({"text"}),
}


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = Field(default=None, max_length=20_000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class SamplingParamsIn(_Strict):
    """The request's sampling parameters, as the client sent them to its model."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = Field(default=None, max_length=32)


class ResponseMessage(_Strict):
    """The response as OpenAI returns `choices[0].message`: text and/or tool calls."""

    role: Literal["assistant"] = "assistant"
    content: Text | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    refusal: Text | None = None


class Usage(_Strict):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class InlineOutcome(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    value: OutcomeValue
    source: OutcomeSource = OutcomeSource.api


class TraceIn(BaseModel):
    """A production trace: what the deployed model was asked and what it answered, in the OpenAI
    chat format."""

    model_config = ConfigDict(extra="forbid")
    external_id: str = Field(
        min_length=1, max_length=256, description="Client idempotency key, unique per tenant."
    )
    policy: str = Field(min_length=1, max_length=64, description="Name of the policy.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    sampling_params: SamplingParamsIn | None = None
    response: Text | ResponseMessage = Field(
        description="What the deployed model answered: a string, or the message object "
        "(`choices[0].message`) with text and/or tool calls."
    )
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    model: str | None = Field(
        default=None, max_length=256, description="Served snapshot name, e.g. `clinical-v3`."
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, max_length=64
    )
    user_id: Short | None = None
    session_id: Short | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    outcome: InlineOutcome | None = None
    occurred_at: datetime | None = None

    @field_validator("external_id")
    @classmethod
    def _no_control_chars(cls, v: str) -> str:
        if _CONTROL_CHAR.search(v):
            raise ValueError("external_id must not contain control characters")
        return v

    @model_validator(mode="after")
    def _response_has_something(self) -> TraceIn:
        r = self.response
        if isinstance(r, ResponseMessage) and r.content is None and not r.tool_calls \
                and r.refusal is None:
            raise ValueError("a response message needs content, tool_calls or a refusal")
        return self


class TraceBatchIn(BaseModel):
    """A batch of traces; each item is validated on its own so one bad item cannot sink the rest.
    Items follow the `TraceIn` schema."""

    model_config = ConfigDict(extra="forbid")
    traces: list[dict[str, Any]] = Field(min_length=1)


class ItemStatus(enum.StrEnum):
    created = "created"
    duplicate = "duplicate"
    conflict = "conflict"
    invalid = "invalid"


class ItemResult(BaseModel):
    index: int
    external_id: str | None
    status: ItemStatus
    id: int | None = None
    split: Split | None = None
    error: dict[str, Any] | None = Field(
        default=None, description="problem+json body for conflict/invalid items"
    )


class BatchResult(BaseModel):
    results: list[ItemResult]
    counts: dict[str, int]


class OutcomeOut(BaseModel):
    name: str
    value: Any
    source: OutcomeSource
    origin: OutcomeOrigin = Field(
        description="`inline` (sent with the trace) or `feedback` (sent afterwards); feedback "
        "outranks inline, and within one origin the later label wins."
    )
    labelled_at: datetime = Field(description="When the label was made.")
    updated_at: datetime


class TraceOut(BaseModel):
    """What was stored, in the shape it was sent (optional fields are omitted when they were
    not sent), plus what the service derived."""

    id: int
    external_id: str
    policy: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    sampling_params: dict[str, Any] | None = None
    response: str | dict[str, Any]
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None
    tags: list[str] | None = None
    user_id: str | None = None
    session_id: str | None = None
    trainable: bool
    untrainable_reason: str | None = Field(
        default=None, description="Why the trace is not trained on, e.g. `image_content`, "
        "`aborted`, `content_filtered`; null when trainable."
    )
    snapshot_id: int | None
    metadata: dict[str, Any]
    split: Split
    redactions: dict[str, Any]
    outcomes: list[OutcomeOut]
    occurred_at: datetime | None
    created_at: datetime


class TracePage(BaseModel):
    items: list[TraceOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


class DeletedTrace(BaseModel):
    id: int
    deleted: bool
    rollouts_deleted: int
    training_run_ids: list[int] = Field(description="Runs whose adapters were trained on it.")
