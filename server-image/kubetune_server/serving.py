"""The request path of both completion endpoints, in four steps.

1. :func:`prepare` (:class:`Incoming` -> :class:`Prepared`): readiness, the model name, the
   prompts tokenised (a chat through the tokenizer's template), and every limit checked: 400
   before anything is queued. Each prompt's token budget is worked out here, once.
2. :func:`submit` (:class:`Prepared` -> :class:`Submitted`): fault injection, then one engine
   :class:`~kubetune_server.engine.Sequence` per choice (``n`` per prompt) onto the queue;
   429 when it is full.
3. :func:`collect` (:class:`Submitted` -> JSON body): waits for every choice to finish.
4. :func:`stream` (:class:`Submitted` -> SSE bytes): sends the text as it comes.

The engine's worker thread reports chunks through ``loop.call_soon_threadsafe`` into one
asyncio queue per request, tagged with the choice's index. Whichever way a request ends
(done, timeout, client gone, error), :meth:`Submitted.close` cancels its rows, so a batch does
not carry them on, and records TTFT and the generated tokens once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from kubetune_server.engine import Chunk, EngineStopped, QueueFull, SamplingParams, Sequence
from kubetune_server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OpenAIError,
    chat_logprobs,
    completion_logprobs,
)
from kubetune_server.state import ServerState

#: The model label of a request refused before its model is known (metrics).
UNKNOWN_MODEL = "unknown"
CHAT = "chat.completion"
TEXT = "text_completion"


@dataclass(frozen=True)
class Incoming:
    """A completion request as its route received it: text prompts or chat messages."""

    state: ServerState
    request: Request
    body: CompletionRequest | ChatCompletionRequest
    #: The response's ``object``: ``text_completion`` or ``chat.completion``.
    kind: str
    #: Completions: one entry per prompt, a text or token ids (None for a chat).
    prompts: list[str] | list[list[int]] | None = None
    #: Chat completions: the conversation (None for completions).
    messages: list[ChatMessage] | None = None

    @property
    def chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class Prepared:
    """A request checked against the model and the limits: what the engine is to run."""

    incoming: Incoming
    #: When the request arrived (monotonic): TTFT, the deadline and queue age count from here.
    started: float
    name: str
    adapter: str | None
    #: Token ids of each prompt, and its text (what ``echo`` sends back).
    token_lists: list[list[int]]
    texts: list[str]
    #: Tokens each prompt may generate: ``max_tokens``, or what the context leaves.
    budgets: list[int]
    stops: tuple[str, ...]
    #: The engine's ``logprobs`` setting (None: none).
    logprobs: int | None


@dataclass(frozen=True)
class Submitted:
    """A request whose choices are queued: one engine sequence each, and their events."""

    prepared: Prepared
    seqs: list[Sequence]
    #: (choice index, chunk) as the engine's worker reports them.
    events: asyncio.Queue[tuple[int, Chunk]]
    deadline: float
    rid: str
    created: int
    #: Per choice, its prompt's text when ``echo`` asked for it.
    echo: list[str] | None
    prompt_tokens: int

    @property
    def incoming(self) -> Incoming:
        return self.prepared.incoming

    def generated(self) -> int:
        """Tokens generated so far, over every choice."""
        return sum(len(q.generated) for q in self.seqs)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        """OpenAI's ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def format_logprobs(self, entries, offset: int = 0) -> dict[str, Any] | None:
        """A choice's ``logprobs`` in the endpoint's shape (None when not asked for)."""
        if self.prepared.logprobs is None:
            return None
        state = self.incoming.state
        if self.incoming.chat:
            return chat_logprobs(entries, state.token_text)
        return completion_logprobs(entries, state.token_text, offset)

    def close(self) -> int:
        """Stop the rows, record TTFT, TPOT and generated tokens; returns the tokens generated."""
        for q in self.seqs:
            q.cancel()
        metrics, name = self.incoming.state.metrics, self.prepared.name
        first = min(
            (q.first_token_at for q in self.seqs if q.first_token_at is not None), default=None
        )
        if first is not None:
            metrics.ttft.labels(model=name).observe(max(0.0, first - self.prepared.started))
        # Decoding speed, one observation per request like vLLM's
        # vllm:request_time_per_output_token_seconds (the canary analysis counts requests).
        per_token = [
            (q.last_token_at - q.first_token_at) / (len(q.generated) - 1)
            for q in self.seqs
            if q.first_token_at is not None
            and q.last_token_at is not None
            and len(q.generated) >= 2
        ]
        if per_token:
            metrics.tpot.labels(model=name).observe(max(0.0, sum(per_token) / len(per_token)))
        done = self.generated()
        metrics.generated_tokens.labels(model=name).inc(done)
        return done


# --- 1. prepare ------------------------------------------------------------------------


def prepare(incoming: Incoming) -> Prepared:
    """Tokenise and check every limit; an OpenAIError (4xx/503) for what cannot be served."""
    started = time.monotonic()
    state, request, body = incoming.state, incoming.request, incoming.body
    s = state.settings
    request.state.kubetune_model = UNKNOWN_MODEL
    state.check_ready()
    name, adapter = state.resolve(body.model)
    request.state.kubetune_model = name
    loaded = state.loaded

    token_lists, texts, prompt_param = _tokenise(incoming, loaded.tokenizer)
    limit = s.server.max_model_len
    if loaded.max_position_embeddings:
        limit = min(limit, loaded.max_position_embeddings)
    max_tokens = body.max_tokens
    if incoming.kind == CHAT and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    max_tokens_param = (
        "max_completion_tokens"
        if incoming.kind == CHAT and body.max_completion_tokens
        else "max_tokens"
    )
    if max_tokens is not None and max_tokens > s.server.max_tokens_limit:
        raise OpenAIError(
            400,
            f"{max_tokens_param} {max_tokens} exceeds this server's limit of {s.server.max_tokens_limit}",
            param=max_tokens_param,
            code="max_tokens_exceeded",
        )
    budgets: list[int] = []
    for i, ids in enumerate(token_lists):
        if not ids:
            if loaded.tokenizer.bos_token_id is None:
                raise OpenAIError(400, f"{prompt_param}: must not be empty", param=prompt_param)
            token_lists[i] = ids = [loaded.tokenizer.bos_token_id]
        if len(ids) >= limit:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {limit} tokens; the {prompt_param} has {len(ids)} tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        wanted = (
            max_tokens
            if max_tokens is not None
            else min(s.server.max_tokens_limit, limit - len(ids))
        )
        if len(ids) + wanted > limit:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {limit} tokens; you requested {len(ids) + wanted} "
                f"({len(ids)} in the {prompt_param}, {wanted} for the completion): lower {max_tokens_param}",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        budgets.append(wanted)
    stops = body.stops()
    if len(stops) > 4:
        raise OpenAIError(400, "stop: at most 4 stop sequences", param="stop")
    return Prepared(
        incoming=incoming,
        started=started,
        name=name,
        adapter=adapter,
        token_lists=token_lists,
        texts=texts,
        budgets=budgets,
        stops=stops,
        logprobs=_logprobs_wanted(body, chat=incoming.chat),
    )


def _tokenise(incoming: Incoming, tokenizer) -> tuple[list[list[int]], list[str], str]:
    """(token ids, text) of each prompt, and the request field that holds them."""
    if incoming.messages is not None:
        conversation = [{"role": m.role, "content": m.text()} for m in incoming.messages]
        try:
            rendered = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:
            raise OpenAIError(
                400, f"messages: the chat template rejected them: {exc}", param="messages"
            ) from None
        return [tokenizer(rendered, add_special_tokens=False)["input_ids"]], [rendered], "messages"
    token_lists: list[list[int]] = []
    texts: list[str] = []
    vocab = len(tokenizer)
    for p in incoming.prompts or ():
        if isinstance(p, str):
            token_lists.append(tokenizer(p)["input_ids"])
            texts.append(p)
            continue
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(
                400,
                f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                param="prompt",
            )
        token_lists.append(list(p))
        texts.append(tokenizer.decode(p))
    return token_lists, texts, "prompt"


def _logprobs_wanted(body, *, chat: bool) -> int | None:
    """The engine's ``logprobs`` setting for a request (None: none); 400 for bad combinations."""
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(400, "top_logprobs: requires logprobs: true", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    if body.logprobs is not None and body.echo:
        raise OpenAIError(
            400,
            "logprobs: with echo the prompt's log-probabilities would be needed, which this server does not compute; drop echo or logprobs",
            param="logprobs",
        )
    return body.logprobs


# --- 2. submit -------------------------------------------------------------------------


async def submit(prepared: Prepared) -> Submitted:
    """Fault injection, then every choice onto the engine's queue (429 when it is full)."""
    incoming = prepared.incoming
    state, body = incoming.state, incoming.body
    s = state.settings
    # Fault injection (demo "bad revision", chaos drills).
    if s.fault_latency_ms > 0:
        await asyncio.sleep(s.fault_latency_ms / 1000.0)
    if state.should_fail():
        raise OpenAIError(
            500,
            "Injected fault (KUBETUNE_FAULT_ERROR_RATE)",
            type="server_error",
            code="injected_fault",
        )

    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Chunk]] = asyncio.Queue()
    seqs: list[Sequence] = []
    for ids, wanted in zip(prepared.token_lists, prepared.budgets, strict=True):
        for _ in range(body.n):
            index = len(seqs)
            params = SamplingParams(
                max_tokens=wanted,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=None if body.seed is None else body.seed + index,
                stop=prepared.stops,
                ignore_eos=body.ignore_eos,
                logprobs=prepared.logprobs,
            )

            def emit(chunk: Chunk, index: int = index) -> None:
                with contextlib.suppress(RuntimeError):  # loop closed: the client is long gone
                    loop.call_soon_threadsafe(events.put_nowait, (index, chunk))

            seqs.append(
                Sequence(
                    list(ids),
                    params,
                    prepared.adapter,
                    emit,
                    arrival=prepared.started,
                    stream=body.stream,
                )
            )
    try:
        state.engine.submit(seqs)
    except QueueFull as exc:
        raise OpenAIError(
            429,
            f"Server busy: {exc}; retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except EngineStopped:
        raise OpenAIError(
            503, "The server is shutting down", type="server_error", code="shutting_down"
        ) from None

    prompt_tokens = sum(len(ids) for ids in prepared.token_lists)
    state.metrics.prompt_tokens.labels(model=prepared.name).inc(prompt_tokens)
    echo = (
        [prepared.texts[i // body.n] for i in range(len(seqs))]
        if getattr(body, "echo", False)
        else None
    )
    return Submitted(
        prepared=prepared,
        seqs=seqs,
        events=events,
        deadline=prepared.started + s.server.request_timeout_seconds,
        rid=("chatcmpl-" if incoming.chat else "cmpl-") + uuid.uuid4().hex[:24],
        created=int(time.time()),
        echo=echo,
        prompt_tokens=prompt_tokens,
    )


# --- 3. collect ------------------------------------------------------------------------


async def collect(run: Submitted) -> dict[str, Any] | Response:
    """Wait for every choice; the whole completion as one JSON body (499 if the client left)."""
    incoming, prepared = run.incoming, run.prepared
    request, s = incoming.request, incoming.state.settings
    count = len(run.seqs)
    texts_out = [""] * count
    entries: list[list] = [[] for _ in run.seqs]
    finish: list[str | None] = [None] * count
    # NB: the client hanging up (its own timeout, a load balancer's) is awaited, not polled:
    # its rows would otherwise generate to max_tokens for nobody. Polling /is_disconnected/
    # every 250 ms woke this thread during every generation, and each wake-up took the GIL
    # from the batch worker (bench/RESULTS.md, profile of server_throughput at concurrency 1).
    gone = asyncio.ensure_future(_disconnected(request))
    got: asyncio.Future | None = None
    try:
        async with asyncio.timeout(max(0.0, run.deadline - time.monotonic())):
            while any(f is None for f in finish):
                got = asyncio.ensure_future(run.events.get())
                await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    request.state.kubetune_code = 499
                    return Response(status_code=499)
                index, chunk = got.result()
                # asyncio.timeout only fires at a suspension point; when the loop was starved
                # (a busy CPU) the queue may already hold every chunk, so check the clock too.
                if time.monotonic() > run.deadline:
                    raise TimeoutError
                if chunk.error:
                    raise OpenAIError(
                        500, chunk.error, type="server_error", code="generation_failed"
                    )
                texts_out[index] += chunk.text
                entries[index].extend(chunk.logprobs)
                if chunk.finish_reason:
                    finish[index] = chunk.finish_reason
    except TimeoutError:
        raise OpenAIError(
            504,
            f"Request timed out after {s.server.request_timeout_seconds}s",
            type="server_error",
            code="timeout",
        ) from None
    finally:
        gone.cancel()
        if got is not None:
            got.cancel()
        completion_tokens = run.close()
    if incoming.chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts_out[i]},
                "logprobs": run.format_logprobs(entries[i]),
                "finish_reason": finish[i],
            }
            for i in range(count)
        ]
    else:
        choices = [
            {
                "index": i,
                "text": (run.echo[i] if run.echo else "") + texts_out[i],
                "logprobs": run.format_logprobs(entries[i]),
                "finish_reason": finish[i],
            }
            for i in range(count)
        ]
    return {
        "id": run.rid,
        "object": incoming.kind,
        "created": run.created,
        "model": prepared.name,
        "choices": choices,
        "usage": run.usage(completion_tokens),
    }


async def _disconnected(request: Request) -> None:
    """Return once the client has hung up (the body is read: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- 4. stream -------------------------------------------------------------------------


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def stream(run: Submitted) -> AsyncIterator[bytes]:
    """SSE chunks as OpenAI sends them, ``data: [DONE]`` last."""
    incoming, body = run.incoming, run.incoming.body
    request, chat, echo = incoming.request, incoming.chat, run.echo
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_kind = "chat.completion.chunk" if chat else TEXT
    # Completions' text_offset counts from the start of the choice's text (echo included).
    offsets = [len(echo[i]) if echo else 0 for i in range(len(run.seqs))]

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse(
            {
                "id": run.rid,
                "object": chunk_kind,
                "created": run.created,
                "model": run.prepared.name,
                "choices": choices,
                **extra,
            }
        )

    def frame(
        index: int, text: str | None, finish: str | None, first: bool = False, entries=()
    ) -> bytes:
        logprobs = run.format_logprobs(entries, offsets[index]) if entries else None
        if logprobs and not chat:
            offsets[index] += sum(len(t) for t in logprobs["tokens"])
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return event([choice])

    pending = set(range(len(run.seqs)))
    try:
        for i in range(len(run.seqs)):
            if chat:
                yield frame(i, "", None, first=True)
            elif echo:
                yield frame(i, echo[i], None)
        while pending:
            try:
                async with asyncio.timeout(max(0.0, run.deadline - time.monotonic())):
                    index, chunk = await run.events.get()
                if time.monotonic() > run.deadline:  # a starved loop: the queue was already full
                    raise TimeoutError
            except TimeoutError:
                request.state.kubetune_code = 504
                err = OpenAIError(504, "Request timed out", type="server_error", code="timeout")
                yield _sse(err.body())
                break
            if chunk.error:
                request.state.kubetune_code = 500
                yield _sse(
                    OpenAIError(
                        500, chunk.error, type="server_error", code="generation_failed"
                    ).body()
                )
                break
            if chunk.text or chunk.logprobs:
                yield frame(index, chunk.text, None, entries=chunk.logprobs)
            if chunk.finish_reason:
                pending.discard(index)
                yield frame(index, None if chat else "", chunk.finish_reason)
        else:
            if include_usage:
                yield event([], usage=run.usage(run.generated()))
        yield b"data: [DONE]\n\n"
    finally:
        # Client gone, timeout or done: stop the rows so the batch does not carry them on.
        run.close()
