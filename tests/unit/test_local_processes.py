"""The local process supervisor (kubetune.local.processes) with real child processes.

Covers: a child and the helpers it starts share one process group and all stop together; a
child that ignores SIGTERM is killed after the grace period; a finished leader leaves no
helper behind; the registry lists live children only and lets another process stop them
(``kubetune local delete`` after a crash); a recycled pid is never signalled; a missing
executable is a clear error; the log captures stdout and stderr.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from kubetune.local.processes import (
    ProcessSpec,
    Supervisor,
    group_alive,
    kill_registered,
    process_start_time,
    read_registry,
)

# A leader that starts a helper (in its own group, as torchrun or a shell would) and waits.
PARENT_WITH_HELPER = """
import subprocess, sys, time, pathlib
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
pathlib.Path(sys.argv[1]).write_text(str(helper.pid))
print("ready", flush=True)
time.sleep(600)
"""

IGNORES_SIGTERM = """
import signal, time, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring", flush=True)
time.sleep(600)
"""


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _alive(pid: int) -> bool:
    # A zombie still has /proc/<pid>; it counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_stop_reaches_helpers_in_the_group(tmp_path):
    sup = Supervisor(registry=tmp_path / "processes.json", grace_seconds=5)
    pidfile = tmp_path / "helper.pid"
    proc = await sup.start(
        ProcessSpec(
            "parent",
            [sys.executable, "-c", PARENT_WITH_HELPER, str(pidfile)],
            dict(os.environ),
            log_path=tmp_path / "log",
        )
    )
    assert _wait_for(pidfile.exists)
    helper = int(pidfile.read_text())
    assert os.getpgid(helper) == proc.pid  # same group as the leader, not ours
    assert os.getpgid(proc.pid) != os.getpgid(0)
    assert [e["name"] for e in read_registry(tmp_path / "processes.json")] == ["parent"]
    await sup.stop("parent")
    assert not proc.running
    assert _wait_for(lambda: not _alive(helper))
    assert not group_alive(proc.pid)
    assert read_registry(tmp_path / "processes.json") == []


async def test_sigterm_ignored_means_sigkill_after_grace(tmp_path):
    sup = Supervisor(grace_seconds=0.5)
    proc = await sup.start(
        ProcessSpec(
            "stubborn",
            [sys.executable, "-c", IGNORES_SIGTERM],
            dict(os.environ),
            log_path=tmp_path / "log",
        )
    )
    assert _wait_for(lambda: b"ignoring" in (tmp_path / "log").read_bytes())
    code = await sup.stop("stubborn")
    assert code == -9
    assert not _alive(proc.pid)


async def test_finished_leader_leaves_no_helper(tmp_path):
    sup = Supervisor()
    script = "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); print(p.pid)"
    await sup.start(
        ProcessSpec(
            "short", [sys.executable, "-c", script], dict(os.environ), log_path=tmp_path / "log"
        )
    )
    assert await sup.wait("short") == 0
    helper = int((tmp_path / "log").read_text().split()[0])
    assert _wait_for(lambda: not _alive(helper))


async def test_registry_lets_another_process_clean_up(tmp_path):
    registry = tmp_path / "processes.json"
    sup = Supervisor(registry=registry)
    proc = await sup.start(
        ProcessSpec(
            "server", [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ)
        )
    )
    # As `kubetune local delete` would, without the supervisor's help.
    assert kill_registered(registry, grace_seconds=5) == ["server"]
    assert await sup.wait("server") is not None
    assert not group_alive(proc.pid)


def test_registry_ignores_recycled_pids(tmp_path):
    registry = tmp_path / "processes.json"
    me = os.getpid()
    registry.write_text(
        f'[{{"name": "old", "pid": {me}, "startTicks": {process_start_time(me) + 1}}}]'
    )
    assert read_registry(registry) == []
    assert kill_registered(registry, grace_seconds=0.1) == []  # and we are still here


async def test_missing_executable_is_a_clear_error(tmp_path):
    sup = Supervisor()
    with pytest.raises(RuntimeError, match="cannot run '/nonexistent/python'"):
        await sup.start(ProcessSpec("x", ["/nonexistent/python"], {}))


async def test_log_captures_both_streams(tmp_path):
    sup = Supervisor()
    script = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    await sup.start(
        ProcessSpec(
            "p", [sys.executable, "-c", script], dict(os.environ), log_path=tmp_path / "log"
        )
    )
    assert await sup.wait("p") == 3
    assert sorted((tmp_path / "log").read_text().split()) == ["err", "out"]
