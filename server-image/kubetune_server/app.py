"""The HTTP side: FastAPI routes, error bodies, metrics middleware, start-up and drain.

Life of a pod:

1. ``python -m kubetune_server`` reads the environment (:mod:`kubetune_server.config`) and
   starts uvicorn at once, so ``/healthz`` answers (the liveness probe must not kill a pod
   that is busy downloading weights). A background thread fetches and loads the model
   (:mod:`kubetune_server.loading`), runs a warm-up generation through the real batch path,
   starts the batch worker, and only then flips ``/readyz`` to 200. A load failure is logged,
   written to the termination log, and the process exits 1.
2. Requests: validate -> tokenise -> limits -> fault injection -> queue (429 when full) ->
   wait for the batch worker (:mod:`kubetune_server.engine`) -> JSON or SSE.
3. SIGTERM: ``/readyz`` turns 503 at once, uvicorn stops accepting connections, requests in
   flight (streams included) run to their end, then the batch worker stops and the process
   exits 0.

Metrics are recorded by one ASGI middleware for every ``/v1/`` request, whatever its outcome
(a 400 from validation counts like a 200), at the moment its last byte is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune_server.config import Settings
from kubetune_server.engine import Chunk, Engine, EngineStopped, QueueFull, SamplingParams, Sequence
from kubetune_server.metrics import Metrics
from kubetune_server.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    chat_logprobs,
    completion_logprobs,
    unsupported_message,
)

log = logging.getLogger("kubetune_server")

MAX_BODY_BYTES = 4 << 20
WARMUP_PROMPT = "Hello"
UNKNOWN_MODEL = "unknown"
# Seconds the engine's worker gets to stop after the HTTP drain (within the pod's exit margin,
# kubetune.rollout.builders.EXIT_MARGIN_SECONDS).
ENGINE_STOP_SECONDS = 5


class ServerState:
    """Everything the routes share: settings, metrics, the engine once loaded, readiness."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.loaded: Any = None
        self.engine: Engine | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        #: Why a live pod will not become ready (fields added to /readyz's answer).
        self.unready: dict[str, Any] = {}
        #: Called (from the loader thread) when loading failed; main() stops uvicorn.
        self.on_fatal = lambda: None
        self._rng = random.Random()
        self._token_texts: dict[int, str] = {}

    # --- loading ------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model, warm up, start the worker, become ready (runs in a thread)."""
        from kubetune_server import loading

        s = self.settings
        try:
            started = time.monotonic()
            self.loaded = loading.load(s)
            engine = Engine(
                self.loaded,
                max_batch_size=s.server.max_batch_size,
                batch_wait_ms=s.server.batch_wait_ms,
                max_queue=s.server.max_queue,
                max_batch_tokens=max(
                    s.server.max_batch_size * 256,
                    s.server.max_model_len + s.server.max_tokens_limit,
                ),
                on_batch=self.metrics.batch_size.observe,
                on_queue=self.metrics.queue_depth.set,
                step_delay_ms=s.fault_token_latency_ms,
            )
            # Warm-up through the real generation path (not counted as a batch in /metrics):
            # allocates, compiles kernels, and proves the weights produce tokens at all.
            ids = self.loaded.tokenizer(WARMUP_PROMPT)["input_ids"]
            warm = Sequence(
                ids, SamplingParams(max_tokens=2, temperature=0.0), None, lambda c: None
            )
            saved, engine._on_batch = engine._on_batch, lambda n: None
            engine.generate([warm])
            engine._on_batch = saved
            if warm.finish_reason is None:
                raise RuntimeError("warm-up generation produced no tokens")
            engine.start()
            self.engine = engine
            self.metrics.info.labels(
                revision=s.revision, model=s.model_name, adapter_digest=self.loaded.digest
            ).set(1)
            self.ready = True
            log.info(
                "ready in %.1fs: serving %s on %s",
                time.monotonic() - started,
                sorted(self.loaded.names),
                self.loaded.device,
            )
        except loading.DigestMismatch as exc:
            # NB: no exit: the pod stays alive and unready, /readyz says which digest it found.
            self.load_error = str(exc)
            self.unready = {
                "reason": loading.DIGEST_MISMATCH,
                "expectedDigest": exc.expected,
                "foundDigest": exc.found,
            }
            log.error("not serving: %s", exc)
        except Exception as exc:
            self.load_error = str(exc)
            log.error("cannot serve: %s", exc, exc_info=not isinstance(exc, loading.LoadError))
            _write_termination(
                s.termination_log,
                "storage_error" if isinstance(exc, loading.LoadError) else "other",
                str(exc),
            )
            self.on_fatal()

    # --- request helpers ----------------------------------------------------------------

    def resolve(self, name: str | None) -> tuple[str, str | None]:
        """(served name, adapter) for a request's ``model``; 404 for an unknown name."""
        names = self.loaded.names if self.loaded else {}
        name = name or self.settings.model_name
        if name not in names:
            raise OpenAIError(
                404,
                f"The model {name!r} does not exist; this server serves {sorted(names) or [self.settings.model_name]}",
                param="model",
                code="model_not_found",
            )
        return name, names[name]

    def check_ready(self) -> None:
        """503 unless the model is loaded and the server is not draining."""
        if self.draining:
            raise OpenAIError(
                503, "The server is shutting down", type="server_error", code="shutting_down"
            )
        if not self.ready or self.engine is None:
            raise OpenAIError(
                503,
                "The model is still loading",
                type="server_error",
                code="not_ready",
                headers={"Retry-After": "5"},
            )

    def token_text(self, token: int) -> str:
        """One token's text (cached: log-probabilities name the same tokens over and over)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self.loaded.tokenizer.decode([token])
            if len(self._token_texts) < 65536:
                self._token_texts[token] = text
        return text

    def should_fail(self) -> bool:
        """Fault injection: whether this request gets an injected 500."""
        rate = self.settings.fault_error_rate
        return rate > 0 and self._rng.random() < rate


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


def _write_termination(path: str | None, outcome: str, message: str) -> None:
    if not path:
        return
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as fh:
        json.dump({"outcome": outcome, "message": message[:3500]}, fh)


def _error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Pydantic adds the union member's type name to the location ("stop.list[str].0"): drop it.
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "list")]
    return ".".join(parts) or None


class MetricsMiddleware:
    """Pure ASGI: body size limit, then request count and duration for ``POST /v1/...``."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        # Only the generation endpoints count: /v1/models polls must not dilute error rates.
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].startswith("/v1/")
        ):
            return await self.app(scope, receive, send)
        started = time.monotonic()
        info = scope.setdefault("state", {})
        status = {"code": 500}
        metrics = self.state.metrics

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                model = info.get("kubetune_model", UNKNOWN_MODEL)
                code = str(info.get("kubetune_code", status["code"]))
                metrics.requests.labels(model=model, code=code).inc()
                metrics.duration.labels(model=model).observe(time.monotonic() - started)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            err = OpenAIError(
                413,
                f"Request body of {int(length)} bytes exceeds {MAX_BODY_BYTES}",
                code="request_too_large",
            )
            return await _error_response(err)(scope, receive, send_wrapper)
        # In flight until the app returns: after the last byte, a client gone mid-stream, or
        # an error (a finally, so that no path leaks a count an autoscaler would act on).
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # Counted as the 500 the server error middleware answers with.
            metrics.requests.labels(
                model=info.get("kubetune_model", UNKNOWN_MODEL), code="500"
            ).inc()
            raise
        finally:
            metrics.in_flight.dec()


class AuthMiddleware:
    """Pure ASGI: with an API key configured, every ``/v1/`` request needs it as a bearer token.

    Probes (/healthz, /readyz), /metrics and the OpenAPI document stay open: the kubelet and
    the canary analysis scrape them without credentials (docs/security.md).
    """

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization")
        # NB: constant-time comparison; the key is never logged nor echoed in the answer.
        if given is not None and hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        err = OpenAIError(
            401,
            "Incorrect API key provided"
            if given
            else "Missing API key: send it as 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        return await _error_response(err)(scope, receive, send)


def create_app(
    settings: Settings, state: ServerState | None = None, *, load: bool = True
) -> FastAPI:
    """The ASGI app; with ``load`` the model loads in a background thread at start-up."""
    state = state or ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            threading.Thread(target=state.load, name="kubetune-loader", daemon=True).start()
        yield
        state.draining = True
        if state.engine is not None:
            # uvicorn already waited up to drain_seconds for requests in flight; what is left
            # belongs to requests it cancelled, so the worker only gets the pod's exit margin.
            await asyncio.to_thread(state.engine.stop, ENGINE_STOP_SECONDS)

    app = FastAPI(
        title="kubetune inference server",
        version="0.1.0",
        description="OpenAI-compatible completions over a base model plus LoRA adapters.",
        lifespan=lifespan,
    )
    app.state.kubetune = state
    if settings.api_key:
        # Added first, so it runs inside MetricsMiddleware: a 401 is counted like any answer.
        app.add_middleware(AuthMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, state=state)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error_response(
                OpenAIError(
                    400, f"Invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])}"
                )
            )
        # An unsupported field is named first: it is the one error that fixing the others
        # would not reveal (the request would "work" and the field be ignored).
        extra = [e for e in errors if e.get("type") == "extra_forbidden"]
        if extra:
            first = extra[0]
        param = _param(tuple(first.get("loc", ())))
        if first.get("type") == "extra_forbidden" and param:
            prefix, _, field = param.rpartition(".")
            message = (prefix + "." if prefix else "") + unsupported_message(field)
        else:
            message = f"{param}: {first['msg']}" if param else str(first["msg"])
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return _error_response(OpenAIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            OpenAIError(exc.status_code, str(exc.detail), type=kind).body(),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(OpenAIError(500, f"Internal error: {exc}", type="server_error"))

    @app.get("/healthz", include_in_schema=True, tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz", tags=["probes"], responses={503: {"description": "Loading, failed or draining"}}
    )
    async def readyz() -> Response:
        """Readiness: model loaded, warm-up generated, not shutting down."""
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.load_error:
            return JSONResponse(
                {"status": "failed", "message": state.load_error, **state.unready},
                status_code=503,
            )
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "models": sorted(state.loaded.names)})

    @app.get("/metrics", tags=["probes"])
    async def metrics() -> Response:
        """Prometheus text exposition (names in docs/contracts.md)."""
        if state.engine is not None:
            state.metrics.queue_depth.set(state.engine.queue_depth)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        """The served models: the default name, extra adapters, and the bare base."""
        names = state.loaded.names if state.loaded else {settings.model_name: None}
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "kubetune",
                    "root": settings.model_uri,
                    "parent": None if adapter is None else settings.base_name,
                }
                for name, adapter in names.items()
            ],
        }

    @app.post("/v1/completions", tags=["openai"], responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI completions (text prompt or a list of prompts; ``stream`` for SSE)."""
        prompt = body.prompt
        # One prompt (text or token ids) or a list of them.
        prompts = (
            [prompt]
            if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
            else prompt
        )
        if not prompts:
            raise OpenAIError(400, "prompt: must not be an empty list", param="prompt")
        return await _serve(state, request, body, "text_completion", prompts, None)

    @app.post("/v1/chat/completions", tags=["openai"], responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI chat completions through the tokenizer's chat template; ``stream`` for SSE."""
        return await _serve(state, request, body, "chat.completion", None, body.messages)

    return app


async def _serve(state: ServerState, request: Request, body, kind: str, prompts, messages):
    """Shared path of both completion endpoints."""
    s = state.settings
    started = time.monotonic()
    request.state.kubetune_model = UNKNOWN_MODEL
    state.check_ready()
    name, adapter = state.resolve(body.model)
    request.state.kubetune_model = name
    loaded = state.loaded
    tokenizer = loaded.tokenizer

    # --- tokenise and enforce the limits ---
    if messages is not None:
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            rendered = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:
            raise OpenAIError(
                400, f"messages: the chat template rejected them: {exc}", param="messages"
            ) from None
        token_lists = [tokenizer(rendered, add_special_tokens=False)["input_ids"]]
        prompt_param, texts = "messages", [rendered]
    else:
        token_lists, texts = [], []
        vocab = len(tokenizer)
        for p in prompts:
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
        prompt_param = "prompt"
    limit = s.server.max_model_len
    if loaded.max_position_embeddings:
        limit = min(limit, loaded.max_position_embeddings)
    max_tokens = body.max_tokens
    if kind == "chat.completion" and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    max_tokens_param = (
        "max_completion_tokens"
        if kind == "chat.completion" and body.max_completion_tokens
        else "max_tokens"
    )
    if max_tokens is not None and max_tokens > s.server.max_tokens_limit:
        raise OpenAIError(
            400,
            f"{max_tokens_param} {max_tokens} exceeds this server's limit of {s.server.max_tokens_limit}",
            param=max_tokens_param,
            code="max_tokens_exceeded",
        )
    for i, ids in enumerate(token_lists):
        if not ids:
            if tokenizer.bos_token_id is None:
                raise OpenAIError(400, f"{prompt_param}: must not be empty", param=prompt_param)
            token_lists[i] = ids = [tokenizer.bos_token_id]
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
    stops = body.stops()
    if len(stops) > 4:
        raise OpenAIError(400, "stop: at most 4 stop sequences", param="stop")
    logprobs = _logprobs_wanted(body, chat=messages is not None)

    # --- fault injection (demo "bad revision", chaos drills) ---
    if s.fault_latency_ms > 0:
        await asyncio.sleep(s.fault_latency_ms / 1000.0)
    if state.should_fail():
        raise OpenAIError(
            500,
            "Injected fault (KUBETUNE_FAULT_ERROR_RATE)",
            type="server_error",
            code="injected_fault",
        )

    # --- queue ---
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Chunk]] = asyncio.Queue()
    seqs: list[Sequence] = []
    for ids in token_lists:
        wanted = (
            max_tokens
            if max_tokens is not None
            else min(s.server.max_tokens_limit, limit - len(ids))
        )
        for _ in range(body.n):
            index = len(seqs)
            params = SamplingParams(
                max_tokens=wanted,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=None if body.seed is None else body.seed + index,
                stop=stops,
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
            )

            def emit(chunk: Chunk, index: int = index) -> None:
                with contextlib.suppress(RuntimeError):  # loop closed: the client is long gone
                    loop.call_soon_threadsafe(events.put_nowait, (index, chunk))

            seqs.append(
                Sequence(list(ids), params, adapter, emit, arrival=started, stream=body.stream)
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

    metrics = state.metrics
    prompt_tokens = sum(len(ids) for ids in token_lists)
    metrics.prompt_tokens.labels(model=name).inc(prompt_tokens)
    deadline = started + s.server.request_timeout_seconds
    rid = ("chatcmpl-" if messages is not None else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    echo = [texts[i // body.n] for i in range(len(seqs))] if getattr(body, "echo", False) else None

    def observe_ttft() -> None:
        first = min((q.first_token_at for q in seqs if q.first_token_at is not None), default=None)
        if first is not None:
            metrics.ttft.labels(model=name).observe(max(0.0, first - started))
        # Decoding speed, one observation per request like vLLM's
        # vllm:request_time_per_output_token_seconds (the canary analysis counts requests).
        per_token = [
            (q.last_token_at - q.first_token_at) / (len(q.generated) - 1)
            for q in seqs
            if q.first_token_at is not None
            and q.last_token_at is not None
            and len(q.generated) >= 2
        ]
        if per_token:
            metrics.tpot.labels(model=name).observe(max(0.0, sum(per_token) / len(per_token)))

    def format_logprobs(entries, offset: int = 0) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        if messages is not None:
            return chat_logprobs(entries, state.token_text)
        return completion_logprobs(entries, state.token_text, offset)

    def count_tokens() -> int:
        done = sum(len(q.generated) for q in seqs)
        metrics.generated_tokens.labels(model=name).inc(done)
        return done

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(
                state,
                request,
                seqs,
                events,
                deadline,
                rid,
                created,
                name,
                kind,
                echo,
                prompt_tokens,
                include_usage,
                observe_ttft,
                count_tokens,
                format_logprobs,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    texts_out = [""] * len(seqs)
    entries: list[list] = [[] for _ in seqs]
    finish: list[str | None] = [None] * len(seqs)
    # NB: the client hanging up (its own timeout, a load balancer's) is awaited, not polled:
    # its rows would otherwise generate to max_tokens for nobody. Polling /is_disconnected/
    # every 250 ms woke this thread during every generation, and each wake-up took the GIL
    # from the batch worker (bench/RESULTS.md, profile of server_throughput at concurrency 1).
    gone = asyncio.ensure_future(_disconnected(request))
    got: asyncio.Future | None = None
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            while any(f is None for f in finish):
                got = asyncio.ensure_future(events.get())
                await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    request.state.kubetune_code = 499
                    return Response(status_code=499)
                index, chunk = got.result()
                # asyncio.timeout only fires at a suspension point; when the loop was starved
                # (a busy CPU) the queue may already hold every chunk, so check the clock too.
                if time.monotonic() > deadline:
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
        for q in seqs:
            q.cancel()
        observe_ttft()
        completion_tokens = count_tokens()
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if messages is not None:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts_out[i]},
                "logprobs": format_logprobs(entries[i]),
                "finish_reason": finish[i],
            }
            for i in range(len(seqs))
        ]
    else:
        choices = [
            {
                "index": i,
                "text": (echo[i] if echo else "") + texts_out[i],
                "logprobs": format_logprobs(entries[i]),
                "finish_reason": finish[i],
            }
            for i in range(len(seqs))
        ]
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": name,
        "choices": choices,
        "usage": usage,
    }


async def _disconnected(request: Request) -> None:
    """Return once the client has hung up (the body is read: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _stream(
    state,
    request,
    seqs,
    events,
    deadline,
    rid,
    created,
    name,
    kind,
    echo,
    prompt_tokens,
    include_usage,
    observe_ttft,
    count_tokens,
    format_logprobs,
) -> AsyncIterator[bytes]:
    """SSE chunks as OpenAI sends them, ``data: [DONE]`` last."""
    chat = kind == "chat.completion"
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    # Completions' text_offset counts from the start of the choice's text (echo included).
    offsets = [len(echo[i]) if echo else 0 for i in range(len(seqs))]

    def frame(
        index: int, text: str | None, finish: str | None, first: bool = False, entries=()
    ) -> bytes:
        logprobs = format_logprobs(entries, offsets[index]) if entries else None
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
        return _sse(
            {
                "id": rid,
                "object": chunk_kind,
                "created": created,
                "model": name,
                "choices": [choice],
            }
        )

    pending = set(range(len(seqs)))
    completion_tokens = 0
    try:
        for i in range(len(seqs)):
            if chat:
                yield frame(i, "", None, first=True)
            elif echo:
                yield frame(i, echo[i], None)
        while pending:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    index, chunk = await events.get()
                if time.monotonic() > deadline:  # a starved loop: the queue was already full
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
                completion_tokens = sum(len(q.generated) for q in seqs)
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield _sse(
                    {
                        "id": rid,
                        "object": chunk_kind,
                        "created": created,
                        "model": name,
                        "choices": [],
                        "usage": usage,
                    }
                )
        yield b"data: [DONE]\n\n"
    finally:
        # Client gone, timeout or done: stop the rows so the batch does not carry them on.
        for q in seqs:
            q.cancel()
        observe_ttft()
        count_tokens()


def main() -> int:
    """Entry point: read the environment, start uvicorn, load in the background, drain on SIGTERM."""
    import sys

    import uvicorn

    from kubetune_server.config import ConfigError, from_env

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = from_env()
    except ConfigError as exc:
        print(f"kubetune_server: configuration error: {exc}", file=sys.stderr)
        import os

        _write_termination(os.environ.get("KUBETUNE_TERMINATION_LOG"), "config_error", str(exc))
        return 2
    state = ServerState(settings)
    app = create_app(settings, state)

    class DrainingServer(uvicorn.Server):
        """uvicorn that turns /readyz to 503 the moment SIGTERM arrives, then drains."""

        def handle_exit(self, sig, frame) -> None:
            if not state.draining:
                log.info("signal %s: not ready any more; finishing requests in flight", sig)
            state.draining = True
            super().handle_exit(sig, frame)
            # NB: uvicorn re-raises the captured signal after its graceful shutdown, so the
            # process would die "by SIGTERM" (exit -15) even though it drained cleanly. A
            # drained SIGTERM is a normal end: exit 0 (SIGINT keeps uvicorn's behaviour).
            import signal

            if sig == signal.SIGTERM and sig in getattr(self, "_captured_signals", []):
                self._captured_signals.remove(sig)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        # In-flight requests may take up to the request timeout; after that, stop anyway.
        timeout_graceful_shutdown=settings.server.drain_seconds,
    )
    server = DrainingServer(config)

    def fatal() -> None:
        server.should_exit = True

    state.on_fatal = fatal
    server.run()
    if state.load_error:
        return 1
    return 0
