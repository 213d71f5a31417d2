"""OpenAI wire format: request models (validated by FastAPI) and the error body.

Fields follow the OpenAI API; the few extras follow vLLM (``ignore_eos``). Every error,
including FastAPI's own validation errors, is answered as ``{"error": {"message", "type",
"param", "code"}}`` with ``param`` naming the offending field (``max_tokens``,
``messages.0.role``).

Strict where clients notice: a field this server does not implement is a 400 naming it, never
silently ignored (OpenAI itself answers "Unrecognized request argument"). A client that asks
for ``tools`` or ``response_format: json_schema`` and gets plain text back would otherwise
misread the answer. The supported set is explicit, per endpoint (the models below, nothing
else); the OpenAI fields in :data:`NEUTRAL` are accepted only with the value that means "off"
(``frequency_penalty: 0``, ``tool_choice: "none"``, ``null`` for any of them), because common
SDKs send those defaults on every request.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: OpenAI fields this server does not implement, each with the values that mean "not used"
#: (accepted and dropped; ``None`` always is). Any other value is a 400 naming the field.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "verbosity": (),
    "prompt_cache_key": (),
    "safety_identifier": (),
}

#: Why a known OpenAI field is refused (the 400 message); unknown fields get a generic one.
UNSUPPORTED_WHY: dict[str, str] = {
    "tools": "tool calling is not supported by this server",
    "tool_calls": "tool calling is not supported by this server",
    "tool_choice": "tool calling is not supported by this server",
    "parallel_tool_calls": "tool calling is not supported by this server",
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "response_format": 'structured output (JSON mode, json_schema) is not supported by this server; only {"type": "text"}',
    "frequency_penalty": "penalties are not supported by this server; only 0",
    "presence_penalty": "penalties are not supported by this server; only 0",
    "logit_bias": "logit_bias is not supported by this server",
    "best_of": "best_of is not supported by this server; use n",
    "suffix": "suffix (insertion) is not supported by this server",
}


def unsupported_message(field: str) -> str:
    """The 400 message for a request field outside an endpoint's supported set."""
    why = UNSUPPORTED_WHY.get(field)
    if why is None and field in NEUTRAL:
        why = f"{field} is not supported by this server"
    return f"{field}: {why or 'unrecognised request argument'}; remove the field"


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


# OpenAI's own limits.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20


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
        (401, "Missing or wrong API key (spec.server.apiKeySecret)"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Queue full; retry after the Retry-After seconds"),
        (500, "Generation failed"),
        (503, "Not ready or shutting down"),
        (504, "Request timed out"),
    )
}


class _Request(BaseModel):
    # NB: "forbid" also tells the OpenAPI document (additionalProperties: false); the
    # validation error handler turns "extra_forbidden" into unsupported_message(field).
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        """Accept (and drop) unimplemented OpenAI fields sent with their "off" value."""
        if not isinstance(data, dict):
            return data
        return {
            k: v
            for k, v in data.items()
            if k in cls.model_fields or k not in NEUTRAL or not (v is None or v in NEUTRAL[k])
        }

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
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="Log-probabilities of each generated token and of this many most likely alternatives.",
    )


class TextPart(BaseModel):
    """A text part of a multi-part message content."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message (tool calls in a message are refused, like ``tools``)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, description="Accepted; not shown to the model.")

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        # SDKs echo an assistant turn back with "tool_calls": null / [] and "refusal": null.
        if not isinstance(data, dict):
            return data
        return {
            k: v
            for k, v in data.items()
            if not (k in ("tool_calls", "function_call", "refusal", "audio") and not v)
        }

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
    logprobs: bool = Field(
        default=False, description="Return the log-probability of each generated token."
    )
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_CHAT_TOP_LOGPROBS,
        description="With logprobs: this many most likely alternatives per token.",
    )


StreamOptions.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


# --- log-probabilities in the OpenAI shapes ------------------------------------------------
# ``entries`` are kubetune_server.engine.TokenLogprob; ``text_of`` turns a token id into its
# text (the tokenizer's decode of that one token, so a token that is half a UTF-8 character
# reads as U+FFFD, as in vLLM); ``bytes`` are that text's UTF-8 bytes.


def chat_logprobs(entries, text_of) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or of one stream chunk)."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries, text_of, offset: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a (legacy) completion; ``offset`` = text before the first token.

    As OpenAI documents it: ``top_logprobs`` holds the ``logprobs`` most likely tokens *and*
    the chosen one, so up to ``logprobs + 1`` entries.
    """
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text = text_of(e.token)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        alternatives: dict[str, float] = {}
        for t, lp in e.top:  # best first; two ids with one text keep the better
            alternatives.setdefault(text_of(t), lp)
        alternatives.setdefault(text, e.logprob)
        top.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }
