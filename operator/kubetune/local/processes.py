"""Process supervisor of the local runtime: each container becomes one local process group.

Why process groups: a trainer or server may start helpers of its own (tokenizer threads are
fine, but torchrun, dataloader workers or a shell wrapper are processes). Each child is started
in a new session (``setsid``), so one ``killpg`` reaches everything it started, and the
terminal's Ctrl-C reaches only the controller, which then stops the children in order: SIGTERM
to every group (the trainer saves a checkpoint within the grace period, exactly as it would on
a node drain), SIGKILL to whatever is left after the grace period.

Two more guards against orphans:

- ``PR_SET_PDEATHSIG``: if the controller itself dies without cleaning up (SIGKILL, OOM), the
  kernel sends SIGTERM to each direct child.
- a registry file (``.kubetune/processes.json``): pid, process group and kernel start time of
  every live child. ``kubetune local delete`` and the next controller use it to stop groups a
  crashed controller left behind; the start time guards against a recycled pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the kernel sends ``sig`` to the child when its parent dies.

    ``PR_SET_PDEATHSIG`` (Linux only; best effort elsewhere). SIGTERM lets a trainer save a
    checkpoint; processes with nothing to save may ask for SIGKILL.
    """

    def setup() -> None:  # pragma: no cover - runs in the forked child
        if sys.platform.startswith("linux"):
            with contextlib.suppress(Exception):
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)

    return setup


def process_start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` (clock ticks since boot), or None if it is gone.

    Together with the pid it identifies one process for good: a recycled pid has a new start
    time, so the registry never kills a stranger.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc.

    ``killpg(pgid, 0)`` is not enough: it succeeds while only zombies are left, and a helper
    whose parent died is a zombie until some init reaps it (in a container, maybe never).
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    """Whether any live process of the process group still exists."""
    if Path("/proc/self/stat").exists():
        return bool(group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ProcessSpec:
    """What to run: the local form of one container."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None
    log_path: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ManagedProcess:
    """A running (or finished) child process group."""

    spec: ProcessSpec
    proc: asyncio.subprocess.Process
    started_at: float
    start_ticks: int | None
    returncode: int | None = None
    finished_at: float | None = None
    stopping: bool = False

    @property
    def pid(self) -> int:
        """Pid of the group leader (also the process group id)."""
        return self.proc.pid

    @property
    def running(self) -> bool:
        """True until the leader has exited."""
        return self.returncode is None


class Supervisor:
    """Starts, watches and stops child process groups; keeps the registry file current."""

    def __init__(self, registry: Path | None = None, grace_seconds: float = 15.0) -> None:
        self.registry = registry
        self.grace_seconds = grace_seconds
        self.processes: dict[str, ManagedProcess] = {}
        self._waiters: dict[str, asyncio.Task[None]] = {}

    # --- starting ---------------------------------------------------------------------------

    async def start(self, spec: ProcessSpec) -> ManagedProcess:
        """Start ``spec`` in its own session; fails if a live process has the same name."""
        old = self.processes.get(spec.name)
        if old is not None and old.running:
            raise RuntimeError(f"process {spec.name!r} is already running (pid {old.pid})")
        stdout: Any = asyncio.subprocess.DEVNULL
        log = None
        if spec.log_path is not None:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(spec.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
            stdout = log
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"process {spec.name!r}: cannot run {spec.argv[0]!r}: {exc}"
            ) from exc
        finally:
            if log is not None:
                log.close()
        managed = ManagedProcess(spec, proc, time.time(), process_start_time(proc.pid))
        self.processes[spec.name] = managed
        self._waiters[spec.name] = asyncio.create_task(self._reap(managed))
        self._write_registry()
        return managed

    async def _reap(self, managed: ManagedProcess) -> None:
        managed.returncode = await managed.proc.wait()
        managed.finished_at = time.time()
        # The leader is gone, but helpers it started may linger in its group: a finished
        # container leaves nothing behind, as in a pod.
        _signal_group(managed.pid, signal.SIGKILL)
        self._write_registry()

    # --- stopping ---------------------------------------------------------------------------

    async def stop(self, name: str, grace_seconds: float | None = None) -> int | None:
        """SIGTERM the group, wait up to the grace period, then SIGKILL; returns the exit code."""
        managed = self.processes.get(name)
        if managed is None:
            return None
        await self._stop_many(
            [managed], self.grace_seconds if grace_seconds is None else grace_seconds
        )
        return managed.returncode

    async def stop_all(self, grace_seconds: float | None = None) -> None:
        """Stop every live group in parallel (one grace period for all, not one each)."""
        live = [m for m in self.processes.values() if m.running]
        await self._stop_many(live, self.grace_seconds if grace_seconds is None else grace_seconds)

    async def _stop_many(self, managed: list[ManagedProcess], grace: float) -> None:
        for m in managed:
            if m.running:
                m.stopping = True
                _signal_group(m.pid, signal.SIGTERM)
        waits = [self._waiters[m.spec.name] for m in managed if m.spec.name in self._waiters]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            if pending:
                for m in managed:
                    if m.running:
                        _signal_group(m.pid, signal.SIGKILL)
                await asyncio.wait(pending, timeout=5)
        for m in managed:
            _signal_group(m.pid, signal.SIGKILL)
        self._write_registry()

    async def wait(self, name: str) -> int | None:
        """Wait for the named process to exit; returns its exit code."""
        waiter = self._waiters.get(name)
        if waiter is not None:
            await asyncio.shield(waiter)
        managed = self.processes.get(name)
        return managed.returncode if managed else None

    def forget(self, name: str) -> None:
        """Drop a finished process from the table (its log stays on disk)."""
        managed = self.processes.get(name)
        if managed is not None and not managed.running:
            del self.processes[name]
            self._waiters.pop(name, None)

    def get(self, name: str) -> ManagedProcess | None:
        """The process of that name, running or finished."""
        return self.processes.get(name)

    # --- registry ---------------------------------------------------------------------------

    def _write_registry(self) -> None:
        if self.registry is None:
            return
        entries = [
            {
                "name": m.spec.name,
                "pid": m.pid,
                "startTicks": m.start_ticks,
                "argv": m.spec.argv,
                "labels": m.spec.labels,
                "controllerPid": os.getpid(),
            }
            for m in self.processes.values()
            if m.running
        ]
        self.registry.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=2))
        os.replace(tmp, self.registry)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def read_registry(registry: Path) -> list[dict[str, Any]]:
    """Entries of the registry file whose process is still the one that was recorded."""
    try:
        entries = json.loads(registry.read_text())
    except (OSError, ValueError):
        return []
    live = []
    for entry in entries:
        pid = int(entry["pid"])
        if entry.get("startTicks") is None or process_start_time(pid) != entry["startTicks"]:
            continue
        # A leader that exited but was not reaped yet (its parent, the controller, died and
        # nobody else reaps in a container) is a zombie: gone for our purposes, unless
        # helpers of its group are still alive.
        if _is_zombie(pid) and not group_alive(pid):
            continue
        live.append(entry)
    return live


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def kill_registered(registry: Path, grace_seconds: float = 10.0) -> list[str]:
    """Stop every group the registry lists that is still alive (synchronously).

    Used by ``kubetune local delete`` and by a new controller to clean up after one that
    crashed. Returns the names of the processes that were stopped.
    """
    entries = read_registry(registry)
    for entry in entries:
        _signal_group(int(entry["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(group_alive(int(e["pid"])) for e in entries):
        time.sleep(0.1)
    for entry in entries:
        _signal_group(int(entry["pid"]), signal.SIGKILL)
    with contextlib.suppress(OSError):
        registry.write_text("[]")
    return [e["name"] for e in entries]
