"""Helpers of the local-runtime end-to-end tests: processes started from a folder, CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def processes_under(folder: Path) -> list[str]:
    """Live processes whose working directory lies under ``folder`` (the local runtime runs
    every container in ``<store>/run/<process>/``, and helpers inherit it): an orphan check that
    needs no list of pids, so it also catches grandchildren nobody recorded."""
    folder = folder.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and (cwd == folder or folder in cwd.parents):
            found.append(f"{entry.name} {cmdline[:160]}")
    return found


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def kubetune(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the real ``kubetune`` command (same interpreter) and capture its output."""
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"kubetune {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder with the demo's base model and dataset (built once per session)."""
    from kubetune.local.demo import DemoSettings, prepare

    work = tmp_path_factory.mktemp("assets")
    prepare(work, DemoSettings.fast(), say=lambda _text: None)
    return work
