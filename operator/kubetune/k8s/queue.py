"""A coalescing, per-key work queue: what turns watch events into level-triggered reconciles.

Many events can arrive for one FineTuneJob at once (its own status write, its Jobs, their
pods). Reconciling once per event would repeat the same reads; reconciling concurrently would
race. So :class:`WorkQueue` (like controller-runtime's workqueue):

- runs at most one ``work(key)`` per key at a time; a trigger that arrives while the key is
  being worked on marks it dirty, and it runs once more afterwards (never lost, never doubled);
- bounds how many keys are worked on concurrently (protects the API server on startup, when
  every object is listed at once);
- ``trigger(key, delay)`` schedules a delayed run (backoff, TTL); only the earliest pending
  delay per key is kept;
- retries failures with exponential backoff per key.

``work(key)`` returns None or the seconds after which it wants to run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)


class WorkQueue:
    """Per-key coalescing scheduler (see the module docstring)."""

    def __init__(
        self,
        work: Callable[[Hashable], Awaitable[float | None]],
        *,
        concurrency: int = 16,
        retry_base: float = 0.5,
        retry_max: float = 60.0,
    ) -> None:
        self._work = work
        self._sem = asyncio.Semaphore(concurrency)
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._running: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[Hashable, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def trigger(self, key: Hashable, delay: float = 0.0) -> None:
        """Work on ``key`` now (or after ``delay`` seconds)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if delay > 0:
            due = loop.time() + delay
            pending = self._timers.get(key)
            if pending and pending[0] <= due:
                return
            if pending:
                pending[1].cancel()
            self._timers[key] = (due, loop.call_at(due, self._fire, key))
            return
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        task = loop.create_task(self._run(key), name=f"reconcile {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.trigger(key)

    def forget(self, key: Hashable) -> None:
        """The object is gone: drop its pending delayed run and failure count."""
        pending = self._timers.pop(key, None)
        if pending:
            pending[1].cancel()
        self._failures.pop(key, None)

    async def _run(self, key: Hashable) -> None:
        try:
            while True:
                self._dirty.discard(key)
                again: float | None
                async with self._sem:
                    try:
                        again = await self._work(key)
                        self._failures.pop(key, None)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - any failure is retried with backoff
                        n = self._failures.get(key, 0)
                        self._failures[key] = n + 1
                        again = min(self._retry_base * 2**n, self._retry_max)
                        log.warning(
                            "reconcile of %s failed (retry in %.1fs): %s",
                            key,
                            again,
                            exc,
                            exc_info=n == 0,
                        )
                if again is not None:
                    self.trigger(key, again)
                if key not in self._dirty or self._closed:
                    break
        finally:
            self._running.discard(key)

    @property
    def idle(self) -> bool:
        """True when nothing is running or waiting to run now (delayed runs do not count)."""
        return not self._running and not self._dirty

    async def close(self) -> None:
        """Cancel pending timers and running work."""
        self._closed = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
