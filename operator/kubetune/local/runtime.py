"""The local controller: one level-triggered loop over the objects in ``.kubetune/``.

It is the local stand-in for the operator *and* the cluster: every tick it re-reads every
object from the store (so ``kubetune local apply`` from another terminal is picked up, like a
watch event), and hands each one to the driver of its kind, which reconciles it with the same
pure logic the operator uses (``kubetune.finetune``, ``kubetune.rollout``) and plays the
kubelet/Job/Deployment controllers with local processes.

Only one controller runs per ``.kubetune/`` folder: its pid (with the kernel start time, so a
recycled pid never counts) is in ``controller.pid``. On start it stops whatever a crashed
predecessor left running (the process registry); on stop (Ctrl-C, SIGTERM, or settled with
``--exit-when-settled``) it stops every child process group before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kubetune.local.processes import Supervisor, kill_registered, process_start_time
from kubetune.local.store import Store


class Driver(Protocol):
    """Reconciles the objects of one kind (see jobs.py and deployments.py)."""

    kind: str

    async def reconcile(self, obj: dict[str, Any]) -> None:
        """Drive one object one step towards its spec; write its status when it changed."""

    def settled(self, obj: dict[str, Any]) -> bool:
        """True when nothing more will happen to the object without a spec change."""

    async def forget(self, name: str) -> None:
        """The object was deleted: stop its processes."""

    async def shutdown(self) -> None:
        """The controller is stopping: release servers, routers, files."""


def controller_pid(store: Store) -> int | None:
    """Pid of the live controller of this store, or None."""
    try:
        info = json.loads(store.controller_pid_file.read_text())
    except (OSError, ValueError):
        return None
    pid = int(info.get("pid", 0))
    if pid and process_start_time(pid) == info.get("startTicks"):
        return pid
    return None


class LocalRuntime:
    """Store + supervisor + drivers, and the loop that ties them together."""

    def __init__(
        self, store: Store, tick_seconds: float = 0.5, grace_seconds: float = 20.0
    ) -> None:
        self.store = store
        self.tick_seconds = tick_seconds
        self.supervisor = Supervisor(registry=store.registry, grace_seconds=grace_seconds)
        self.drivers: dict[str, Driver] = {}
        self._known: dict[str, set[str]] = {}
        self._stopping = asyncio.Event()
        self._started = False
        self.errors: dict[str, str] = {}

    def add_driver(self, driver: Driver) -> None:
        """Register the driver of a kind."""
        self.drivers[driver.kind] = driver

    # --- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Claim the store (one controller per folder) and clean up after a crashed one."""
        other = controller_pid(self.store)
        if other is not None and other != os.getpid():
            raise RuntimeError(
                f"another kubetune local controller (pid {other}) is running on {self.store.root}; "
                "`kubetune local apply` hands manifests to it, `kubetune local delete --all` stops it"
            )
        leftovers = kill_registered(self.store.registry, grace_seconds=5)
        if leftovers:
            print(
                f"stopped {len(leftovers)} process(es) left by a previous controller: {', '.join(leftovers)}"
            )
        self.store.root.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        self.store.controller_pid_file.write_text(
            json.dumps({"pid": me, "startTicks": process_start_time(me)})
        )
        self._started = True

    async def stop(self) -> None:
        """Stop every driver and child process group; release the store."""
        self._stopping.set()
        for driver in self.drivers.values():
            with contextlib.suppress(Exception):
                await driver.shutdown()
        await self.supervisor.stop_all()
        if self._started and controller_pid(self.store) == os.getpid():
            with contextlib.suppress(OSError):
                self.store.controller_pid_file.unlink()
        self._started = False

    def request_stop(self) -> None:
        """Ask the loop to end (signal handlers call this)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stopping.is_set()

    # --- the loop ---------------------------------------------------------------------------

    async def reconcile_once(self) -> None:
        """One pass over every stored object, kind by kind (FineTuneJobs before deployments)."""
        for kind, driver in self.drivers.items():
            objects = self.store.list(kind)
            names = {o["metadata"]["name"] for o in objects}
            for gone in self._known.get(kind, set()) - names:
                await driver.forget(gone)
            self._known[kind] = names
            for obj in objects:
                key = f"{kind}/{obj['metadata']['name']}"
                try:
                    await driver.reconcile(obj)
                    self.errors.pop(key, None)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one bad object must not stop the others
                    # Level-triggered: report, and try again next tick (like a Kopf handler retry).
                    message = f"{type(exc).__name__}: {exc}"
                    if self.errors.get(key) != message:
                        print(f"error reconciling {key}: {message}")
                    self.errors[key] = message

    def settled(self) -> bool:
        """True when every object is settled (nothing happens without a new apply)."""
        for kind, driver in self.drivers.items():
            for obj in self.store.list(kind):
                if not driver.settled(obj):
                    return False
        return True

    async def run(
        self,
        until: Callable[[], bool] | None = None,
        timeout: float | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> bool:
        """Reconcile every tick until ``until()`` holds, a stop is requested or the timeout hits.

        Returns True when ``until`` was met (False on stop or timeout).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping.is_set():
            await self.reconcile_once()
            if on_tick is not None:
                on_tick()
            if until is not None and until():
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.tick_seconds)
        return False


def install_signal_handlers(runtime: LocalRuntime) -> Callable[[], None]:
    """Ctrl-C and SIGTERM end the loop (the caller then runs ``runtime.stop()``).

    A second Ctrl-C while stopping is ignored on purpose: the trainer is writing its SIGTERM
    checkpoint, and killing it halfway would throw that work away. Returns an uninstaller.
    """
    loop = asyncio.get_running_loop()
    count = {"n": 0}

    def handler(signame: str) -> None:
        count["n"] += 1
        if count["n"] == 1:
            print(
                f"\n{signame}: stopping every local process (trainers checkpoint first)...",
                flush=True,
            )
        runtime.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler, sig.name)

    def uninstall() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    return uninstall


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def build_runtime(
    store: Store,
    router_host: str = "127.0.0.1",
    tick_seconds: float = 0.5,
    on_event: Any = None,
) -> LocalRuntime:
    """A runtime with the FineTuneJob and ModelDeployment drivers registered.

    ``on_event(kind, name, type, reason, message)`` sees every Event the decision functions
    emit (they also go to ``<store>/events.jsonl``, the local ``kubectl get events``).
    """
    from kubetune.local.deployments import DeploymentDriver
    from kubetune.local.jobs import JobDriver

    runtime = LocalRuntime(store, tick_seconds=tick_seconds)
    runtime.add_driver(JobDriver(store, runtime.supervisor, on_event=on_event))
    runtime.add_driver(
        DeploymentDriver(store, runtime.supervisor, router_host=router_host, on_event=on_event)
    )
    return runtime
