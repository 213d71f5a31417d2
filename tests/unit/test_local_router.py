"""The local weighted router (kubetune.local.router), against real HTTP backends on loopback.

Covers: exact traffic split by smooth weighted round-robin; weight 0 takes a backend out at the
next request; an all-zero table answers 503; an unreachable backend gives 502 and is counted;
streamed (SSE-like) bodies pass through chunk by chunk; method, path, query and body are kept;
negative weights and unknown backends are refused with a clear error; a client that hangs up
before the answer is counted as 499, apart from backend failures, so the router agrees with the
backend's own count.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from kubetune.local.containers import free_port
from kubetune.local.router import WeightedRouter


async def _backend(name: str, status: int = 200):
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            await asyncio.sleep(0.3)
            return web.json_response({"backend": name})
        if request.path == "/stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        body = await request.read()
        return web.json_response(
            {
                "backend": name,
                "method": request.method,
                "path": request.path_qs,
                "body": body.decode(),
            },
            status=status,
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def two_backends():
    stable_runner, stable_url = await _backend("stable")
    canary_runner, canary_url = await _backend("canary", status=500)
    router = WeightedRouter()
    await router.start()
    async with aiohttp.ClientSession() as session:
        yield router, session, stable_url, canary_url
    await router.stop()
    await stable_runner.cleanup()
    await canary_runner.cleanup()


async def _send(session, router, n, path="/v1/completions"):
    seen = []
    for _ in range(n):
        async with session.post(router.url + path, json={"prompt": "x"}) as resp:
            seen.append((resp.headers.get("X-Kubetune-Backend"), resp.status))
            await resp.read()
    return seen


async def test_split_is_exact_for_90_10(two_backends):
    router, session, stable_url, canary_url = two_backends
    router.set_backends({"stable": (stable_url, 90), "canary": (canary_url, 10)})
    seen = await _send(session, router, 100)
    assert sum(1 for b, _ in seen if b == "canary") == 10
    assert sum(1 for b, _ in seen if b == "stable") == 90
    # The canary's 500s are passed through and counted per backend and code.
    assert router.stats()["canary"]["requests"] == {500: 10}
    assert router.stats()["stable"]["requests"] == {200: 90}


async def test_weight_zero_removes_backend_at_next_request(two_backends):
    router, session, stable_url, canary_url = two_backends
    router.set_backends({"stable": (stable_url, 50), "canary": (canary_url, 50)})
    await _send(session, router, 4)
    router.set_weight("canary", 0)
    seen = await _send(session, router, 20)
    assert {b for b, _ in seen} == {"stable"}
    assert router.weight_log[-1][1] == {"stable": 50, "canary": 0}


async def test_all_weights_zero_answers_503(two_backends):
    router, session, stable_url, _ = two_backends
    router.set_backends({"stable": (stable_url, 0)})
    async with session.get(router.url + "/v1/models") as resp:
        assert resp.status == 503
        assert "no backend" in (await resp.json())["error"]["message"]


async def test_unreachable_backend_gives_502(two_backends):
    router, session, _, _ = two_backends
    router.set_backends({"gone": (f"http://127.0.0.1:{free_port()}", 1)})
    async with session.get(router.url + "/healthz") as resp:
        assert resp.status == 502
        assert resp.headers["X-Kubetune-Backend"] == "gone"
    assert router.stats()["gone"]["requests"] == {502: 1}


async def test_request_is_forwarded_intact_and_streams(two_backends):
    router, session, stable_url, _ = two_backends
    router.set_backends({"stable": (stable_url, 1)})
    async with session.put(router.url + "/a/b?x=1&y=2", data=b"payload") as resp:
        body = await resp.json()
    assert body == {"backend": "stable", "method": "PUT", "path": "/a/b?x=1&y=2", "body": "payload"}
    async with session.get(router.url + "/stream") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    assert text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_bad_weights_are_refused():
    router = WeightedRouter()
    with pytest.raises(ValueError, match="must be >= 0"):
        router.set_backends({"a": ("http://127.0.0.1:1", -1)})
    with pytest.raises(KeyError, match="no backend 'b'"):
        router.set_weight("b", 1)


async def test_client_hanging_up_is_499_not_a_backend_failure(two_backends):
    router, session, stable_url, canary_url = two_backends
    router.set_backends({"stable": (stable_url, 100), "canary": (canary_url, 0)})
    with pytest.raises(asyncio.TimeoutError):
        async with session.get(
            router.url + "/slow", timeout=aiohttp.ClientTimeout(total=0.05)
        ) as resp:
            await resp.read()
    for _ in range(50):
        if router.stats()["stable"]["total"]:
            break
        await asyncio.sleep(0.02)
    # The backend answered 200 after the client left; the router says 499, never 502.
    assert router.stats()["stable"]["requests"] == {499: 1}
