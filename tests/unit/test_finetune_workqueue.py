"""The coalescing work queue behind the FineTuneJob (and ModelDeployment) handlers.

Covers: one run per key at a time; triggers during a run coalesce into exactly one more run;
different keys run concurrently up to the limit; a delayed trigger keeps only the earliest
pending time and an immediate trigger is not held back by it; failures are retried; the
returned requeue delay schedules the next run; forget() drops a pending delayed run; close()
cancels everything.
"""

from __future__ import annotations

import asyncio

from kubetune.k8s.queue import WorkQueue


async def settle(queue: WorkQueue) -> None:
    # Event-driven, no timing: give the loop turns until no work is running.
    for _ in range(1000):
        if queue.idle:
            return
        await asyncio.sleep(0)
    raise AssertionError("queue did not settle")


async def test_triggers_during_a_run_coalesce_into_one_more_run():
    runs: list[str] = []
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def work(key):
        runs.append(key)
        entered.set()
        await gate.wait()
        return None

    q = WorkQueue(work)
    q.trigger("a")
    await entered.wait()
    for _ in range(5):
        q.trigger("a")  # while running: coalesced
    gate.set()
    await settle(q)
    assert runs == ["a", "a"]
    await q.close()


async def test_one_key_never_runs_concurrently_but_different_keys_do():
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    both = asyncio.Event()
    gate = asyncio.Event()

    async def work(key):
        active[key] = active.get(key, 0) + 1
        peak[key] = max(peak.get(key, 0), active[key])
        if len([k for k, v in active.items() if v]) == 2:
            both.set()
        await gate.wait()
        active[key] -= 1
        return None

    q = WorkQueue(work, concurrency=2)
    q.trigger("a")
    q.trigger("b")
    q.trigger("a")
    await both.wait()  # a and b run at the same time
    gate.set()
    await settle(q)
    assert peak == {"a": 1, "b": 1}
    await q.close()


async def test_failures_are_retried_and_requeue_delay_schedules_the_next_run():
    calls: list[int] = []
    done = asyncio.Event()

    async def work(key):
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("API down")
        if len(calls) == 2:
            return 0.001  # the plan asked to look again soon
        done.set()
        return None

    q = WorkQueue(work, retry_base=0.001)
    q.trigger("a")
    await asyncio.wait_for(done.wait(), 10)
    assert calls == [0, 1, 2]
    await q.close()


async def test_delayed_trigger_keeps_the_earliest_and_immediate_one_is_not_held_back():
    runs: list[str] = []
    ran = asyncio.Event()

    async def work(key):
        runs.append(key)
        ran.set()
        return None

    q = WorkQueue(work)
    q.trigger("a", 3600)
    q.trigger("a", 7200)  # later than the pending one: ignored
    assert len(q._timers) == 1 and q._timers["a"][0] < asyncio.get_running_loop().time() + 3601
    q.trigger("a")  # now: runs at once despite the pending delayed run
    await asyncio.wait_for(ran.wait(), 10)
    assert runs == ["a"]
    q.forget("a")
    assert q._timers == {}
    await q.close()


async def test_close_cancels_running_work_and_ignores_later_triggers():
    cancelled = asyncio.Event()
    entered = asyncio.Event()

    async def work(key):
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    q = WorkQueue(work)
    q.trigger("a")
    await entered.wait()
    await q.close()
    assert cancelled.is_set()
    q.trigger("b")
    assert q.idle
