"""The HTTP side: FastAPI routes, error bodies, metrics middleware, start-up and drain.

Life of a pod:

1. ``python -m kubetune_server`` reads the environment (:mod:`kubetune_server.config`) and
   starts uvicorn at once, so ``/healthz`` answers (the liveness probe must not kill a pod
   that is busy downloading weights). A background thread fetches and loads the model
   (:mod:`kubetune_server.loading`; :class:`~kubetune_server.state.ServerState`), runs a
   warm-up generation through the real batch path, starts the batch worker, and only then
   flips ``/readyz`` to 200. A load failure is logged,
   written to the termination log, and the process exits 1.
2. Requests (:mod:`kubetune_server.serving`): validate -> prepare (tokenise, limits) ->
   submit (fault injection, queue: 429 when full) -> the batch worker
   (:mod:`kubetune_server.engine`) -> collect (JSON) or stream (SSE).
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
import logging
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune_server import serving
from kubetune_server.config import Settings
from kubetune_server.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    unsupported_message,
)
from kubetune_server.serving import UNKNOWN_MODEL, Incoming
from kubetune_server.state import ServerState, write_termination

__all__ = ["ServerState", "create_app", "main"]

log = logging.getLogger("kubetune_server")

MAX_BODY_BYTES = 4 << 20
# Seconds the engine's worker gets to stop after the HTTP drain (within the pod's exit margin,
# kubetune.rollout.builders.EXIT_MARGIN_SECONDS).
ENGINE_STOP_SECONDS = 5


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
        return await _serve(Incoming(state, request, body, serving.TEXT, prompts=prompts))

    @app.post("/v1/chat/completions", tags=["openai"], responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI chat completions through the tokenizer's chat template; ``stream`` for SSE."""
        return await _serve(Incoming(state, request, body, serving.CHAT, messages=body.messages))

    return app


async def _serve(incoming: Incoming):
    """Shared path of both completion endpoints: prepare, submit, then collect or stream."""
    run = await serving.submit(serving.prepare(incoming))
    if incoming.body.stream:
        return StreamingResponse(
            serving.stream(run),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await serving.collect(run)


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

        write_termination(os.environ.get("KUBETUNE_TERMINATION_LOG"), "config_error", str(exc))
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
