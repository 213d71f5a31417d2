"""The local weighted router: an HTTP reverse proxy on loopback in front of the server processes.

In a cluster an HTTPRoute (or a Service over both revisions) splits traffic; locally this
router does, with the weights the rollout state machine asks for. It is deliberately simple:

- Smooth weighted round-robin (the nginx algorithm) instead of random choice: with weights
  90/10 exactly one request in ten goes to the canary, so analysis sees a predictable sample
  size and the benchmark counts are reproducible.
- A weight of 0 takes a backend out of rotation at once: the next request already avoids it.
  Requests in flight finish (the canary is scaled down only after its weight is 0).
- Responses are streamed chunk by chunk, so server-sent events (``stream: true``) work.
- Counters per backend and status code, read by the benchmark and the demo summary, and served
  on ``/router/stats`` (JSON) for humans.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

# Headers that describe one hop, not the message (RFC 9110, section 7.6.1): never forwarded.
# nginx's status for "client closed the connection before the answer" (never sent on the wire).
CLIENT_CLOSED = 499

_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


@dataclass
class Backend:
    """One upstream (a revision's server process) and its share of traffic."""

    name: str
    url: str
    weight: int = 0
    current: int = 0  # smooth-WRR state
    requests: Counter[int] = field(default_factory=Counter)


class WeightedRouter:
    """Reverse proxy that spreads requests over backends in proportion to their weights."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.backends: dict[str, Backend] = {}
        self.weight_log: list[tuple[float, dict[str, int]]] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # --- weights ----------------------------------------------------------------------------

    def set_backends(self, weights: dict[str, tuple[str, int]]) -> None:
        """Replace the routing table: ``{name: (url, weight)}``; names not listed are removed.

        Weights are relative (the rollout engine passes percentages). Changes take effect for
        the next request; the time of each change is logged for the demo and the benchmark.
        """
        for name, (url, weight) in weights.items():
            if weight < 0:
                raise ValueError(f"router weight of {name!r} must be >= 0, got {weight}")
            backend = self.backends.get(name)
            if backend is None or backend.url != url:
                self.backends[name] = Backend(name, url.rstrip("/"), weight)
            else:
                backend.weight = weight
        for name in list(self.backends):
            if name not in weights:
                del self.backends[name]
        self.weight_log.append((time.time(), self.weights()))

    def set_weight(self, name: str, weight: int) -> None:
        """Change one backend's weight (it must exist)."""
        if name not in self.backends:
            raise KeyError(f"router has no backend {name!r} (has {sorted(self.backends)})")
        table = {n: (b.url, b.weight) for n, b in self.backends.items()}
        table[name] = (table[name][0], weight)
        self.set_backends(table)

    def weights(self) -> dict[str, int]:
        """Current weights by backend name."""
        return {n: b.weight for n, b in self.backends.items()}

    def choose(self) -> Backend | None:
        """Pick the next backend (smooth weighted round-robin), or None if all weights are 0."""
        live = [b for b in self.backends.values() if b.weight > 0]
        if not live:
            return None
        total = sum(b.weight for b in live)
        best = None
        for b in live:
            b.current += b.weight
            if best is None or b.current > best.current:
                best = b
        assert best is not None
        best.current -= total
        return best

    def stats(self) -> dict[str, dict[str, object]]:
        """Requests per backend by status code.

        502: the backend could not be reached or broke off its answer. 499 (nginx's "client
        closed request"): the client hung up first, whatever the backend answered; the backend
        counted its own answer (usually a 200), so 499 is not a backend failure.
        """
        return {
            n: {
                "url": b.url,
                "weight": b.weight,
                "requests": dict(b.requests),
                "total": sum(b.requests.values()),
            }
            for n, b in self.backends.items()
        }

    # --- serving ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL clients send requests to."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        """Listen on loopback; returns the base URL (port 0 picks a free port)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/router/stats", self._handle_stats)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=256),
            auto_decompress=False,
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        """Stop listening and close upstream connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"weights": self.weights(), "backends": self.stats()})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        backend = self.choose()
        if backend is None:
            return web.json_response(
                {"error": {"message": "no backend has traffic weight > 0", "type": "unavailable"}},
                status=503,
            )
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["X-Forwarded-For"] = request.remote or ""
        body = await request.read()
        response: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method,
                backend.url + request.rel_url.raw_path_qs,
                headers=headers,
                data=body or None,
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in _HOP_HEADERS:
                        response.headers[key] = value
                response.headers["X-Kubetune-Backend"] = backend.name
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                backend.requests[upstream.status] += 1
                return response
        except asyncio.CancelledError:
            # The server cancels a handler whose client went away (handler_cancellation).
            backend.requests[CLIENT_CLOSED] += 1
            raise
        except (TimeoutError, aiohttp.ClientError, ConnectionResetError) as exc:
            if request.transport is None or request.transport.is_closing():
                # The client hung up (a timeout of its own): writing to it failed, not the backend.
                backend.requests[CLIENT_CLOSED] += 1
                return response if response is not None else web.Response(status=CLIENT_CLOSED)
            backend.requests[502] += 1
            if response is not None and response.prepared:
                # Headers already went out: all we can do is cut the body short.
                return response
            return web.json_response(
                {
                    "error": {
                        "message": f"backend {backend.name} failed: {exc}",
                        "type": "bad_gateway",
                    }
                },
                status=502,
                headers={"X-Kubetune-Backend": backend.name},
            )
