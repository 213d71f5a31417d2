"""OpenAI wire format: request models (validated by FastAPI) and the error body.

Fields follow the OpenAI API; the few extras follow vLLM (``ignore_eos``). Unknown fields are
ignored, as OpenAI does, so newer clients keep working. Every error, including FastAPI's own
validation errors, is answered as ``{"error": {"message", "type", "param", "code"}}`` with
``param`` naming the offending field (``max_tokens``, ``messages.0.role``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """An error answered with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ErrorDetail(BaseModel):
    """The ``error`` object of an error response."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx response."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Invalid request (the param names the field)"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Queue full; retry after the Retry-After seconds"),
        (500, "Generation failed"),
        (503, "Not ready or shutting down"),
        (504, "Request timed out"),
    )
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        default=None, description="Served model name (see /v1/models); default: the default model."
    )
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(default=1, ge=1, le=16, description="Choices per prompt.")
    stream: bool = Field(default=False, description="Server-sent events.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Sampling seed.")
    ignore_eos: bool = Field(
        default=False, description="Keep generating after the end-of-sequence token (vLLM)."
    )
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple (empty strings dropped)."""
        if self.stop is None:
            return ()
        items = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in items if s)


class StreamOptions(BaseModel):
    """``stream_options``: include a final usage chunk."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Prompt text, a list of prompts, or token ids (one list, or a list of lists)."
    )
    max_tokens: int | None = Field(default=16, ge=1, description="Most tokens to generate.")
    echo: bool = Field(default=False, description="Prepend the prompt to the text.")


class TextPart(BaseModel):
    """A text part of a multi-part message content."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Alias of max_tokens (newer clients)."
    )


StreamOptions.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
