"""Generated client load on a local ModelDeployment: golden prompts at a steady rate.

``kubetune demo`` runs it while a canary is analysed (analysis needs ``minSamples`` requests per
interval), and ``kubetune local traffic`` runs it next to a controller started by hand. Each
answer is scored by exact match against the prompt's answer, per revision (the router names the
backend that answered in a header), so the demo can show which revision answered well.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubetune.api.answers import EXACT, is_correct


class Load(Protocol):
    """How much load: ``requests_per_second`` over ``concurrency`` clients (DemoSettings has both)."""

    @property
    def requests_per_second(self) -> float: ...

    @property
    def concurrency(self) -> int: ...


@dataclass
class TrafficStats:
    """What the clients saw, per revision (the router names the backend in a header)."""

    codes: dict[str, Counter[int]] = field(default_factory=dict)
    correct: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)

    def record(self, revision: str, code: int, ok: bool | None) -> None:
        """Count one response."""
        self.codes.setdefault(revision, Counter())[code] += 1
        if ok is not None:
            self.answered[revision] += 1
            self.correct[revision] += int(ok)


class Traffic:
    """Open-loop-ish client load on the router: golden prompts at a steady rate."""

    def __init__(
        self,
        url_of: Any,
        golden: list[dict[str, str]],
        load: Load,
        model: str,
        api_key: str | None = None,
    ) -> None:
        self.model = model
        self.load = load
        #: Sent as a bearer token (spec.server.apiKeySecret); never printed.
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url_of = url_of
        self.golden = golden
        self.stats = TrafficStats()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Start the client tasks."""
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.load.concurrency)]

    async def stop(self) -> None:
        """Stop the clients and close the session."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self._session.close()

    async def _client(self, index: int) -> None:
        import aiohttp

        rng = random.Random(index)
        period = self.load.concurrency / self.load.requests_per_second
        while not self._stop.is_set():
            started = time.monotonic()
            url = self.url_of()
            if url:
                example = rng.choice(self.golden)
                body = {
                    "model": self.model,
                    "messages": [{"role": "user", "content": example["prompt"]}],
                    "max_tokens": 8,
                    "temperature": 0,
                }
                try:
                    async with self._session.post(
                        url + "/v1/chat/completions", json=body, headers=self._headers
                    ) as response:
                        backend = response.headers.get("X-Kubetune-Backend", "none").split("/", 1)[
                            0
                        ]
                        ok = None
                        if response.status == 200:
                            data = await response.json()
                            answer = data["choices"][0]["message"]["content"]
                            ok = is_correct(answer, example["answer"], EXACT)
                        else:
                            await response.read()
                        self.stats.record(backend, response.status, ok)
                except (aiohttp.ClientError, TimeoutError, OSError, KeyError, ValueError):
                    self.stats.record("none", 599, None)
            delay = period - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=max(0.0, delay))
