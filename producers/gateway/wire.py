"""The HTTP shapes the gateway accepts and returns: OpenAI chat completions and feedback.

Requests are validated with pydantic; unknown OpenAI fields (`store`, `parallel_tool_calls`,
`reasoning_effort`, ...) are accepted and ignored, so real clients are not refused for
options this gateway does not act on. `response_format` (JSON object or schema) and a forced
`tool_choice` ("required" or a named function) are enforced by constrained decoding
(producers.gateway.constraints); `logprobs` / `top_logprobs` are honoured
(producers.gateway.logprobs). Errors use OpenAI's `{"error": {...}}` body.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.events import FeedbackKind


MAX_STOPS = 32


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class JsonSchemaFormat(_Lenient):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)   # vLLM's extension; -1 or 0: all
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    user: str | None = None
    logprobs: bool | None = None        # null is false, as clients that send every field write it
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # nextstate extensions (headers take precedence)
    session_id: str | None = Field(default=None, min_length=1, max_length=256)
    turn_type: Literal["main", "side", "MAIN", "SIDE"] | None = None
    # vLLM's extension: the last message is a partial assistant message the reply continues
    # (a prefill; it is prompt, never trained on, and the reply holds only the continuation)
    continue_final_message: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"n={v} is not supported; every turn is recorded as one sample, use n=1")
        return v

    @model_validator(mode="after")
    def _top_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.top_logprobs and self.stream:
            raise ValueError("top_logprobs with stream: true is not supported here: the engine samples "
                             "without them and they come from scoring the finished answer; ask without "
                             "stream, or stream with logprobs: true alone")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        # OpenAI takes 4, vLLM any number; clients written for the latter send more
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(v)}")
        return v

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def dumped_messages(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def dumped_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class FeedbackRequest(BaseModel):
    """An explicit next state for a session's turn (default: its latest)."""

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(min_length=1, max_length=256)
    kind: FeedbackKind
    turn_index: int | None = Field(default=None, ge=0)
    text: str | None = None
    thumbs: Literal[-1, 1] | None = None
    reward: float | None = Field(default=None, ge=-1.0, le=1.0)
    exit_code: int | None = None
    passed: bool | None = None
    source: str = Field(default="client", max_length=256)
    metadata: dict[str, Any] | None = None
    parent_ids: list[str] = Field(default_factory=list)
    group_id: str | None = Field(default=None, min_length=1, max_length=256)   # a rollout's group (X-Group-Id)

    @field_validator("kind", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _needs(self) -> "FeedbackRequest":
        needed = {
            FeedbackKind.THUMBS: ("thumbs", self.thumbs),
            FeedbackKind.OUTCOME_REWARD: ("reward", self.reward),
            FeedbackKind.USER_MESSAGE: ("text", self.text),
            FeedbackKind.TOOL_OUTPUT: ("text", self.text),
        }.get(self.kind)
        if needed is not None and needed[1] is None:
            raise ValueError(f"kind {self.kind.value} needs the field {needed[0]!r}")
        if self.kind is FeedbackKind.TERMINAL_OUTPUT and self.text is None and self.exit_code is None:
            raise ValueError("kind TERMINAL_OUTPUT needs 'text' or 'exit_code'")
        if self.kind is FeedbackKind.TEST_RESULT and self.passed is None and self.reward is None:
            raise ValueError("kind TEST_RESULT needs 'passed' or 'reward'")
        return self


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def first_field(exc: ValidationError) -> str | None:
    """The path of the first invalid field (`messages.0.role`), OpenAI's `param`; None for the body."""
    errors = exc.errors()
    return (".".join(str(p) for p in errors[0]["loc"]) or None) if errors else None


def describe(exc: ValidationError) -> str:
    """A pydantic error as one readable line: where, and what was wrong."""
    parts = []
    for err in exc.errors()[:8]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - 8
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
