"""What the routes share: settings, metrics, the loaded model and engine, readiness.

``ServerState.load`` runs once in a background thread (fetch and load the model, warm up
through the real batch path, start the engine's worker); the request path
(:mod:`kubetune_server.serving`) reads the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from typing import Any

from kubetune_server.config import Settings
from kubetune_server.engine import Engine, SamplingParams, Sequence
from kubetune_server.metrics import Metrics
from kubetune_server.protocol import OpenAIError

log = logging.getLogger("kubetune_server")

WARMUP_PROMPT = "Hello"


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
            write_termination(
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


def write_termination(path: str | None, outcome: str, message: str) -> None:
    """The pod's termination message (``terminationMessagePath``): outcome and message."""
    if not path:
        return
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as fh:
        json.dump({"outcome": outcome, "message": message[:3500]}, fh)
