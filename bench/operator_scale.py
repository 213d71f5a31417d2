"""Operator scale: N FineTuneJobs created at once against kmock; how long until each has its
first child Job (``<ftj>-validate``)?

For each N (default 20 and 200) the benchmark starts a fresh kmock API server (in-process
thread, over loopback HTTP) and the real operator as a separate process (``kubetune
operator``), waits until the operator is warm (one FineTuneJob fully handled), then creates N
FineTuneJobs concurrently and polls the API server's store every 20 ms for the validate Jobs.

Printed per N: time until all N have their Job, p50/p95/max of the per-object latency (create
-> Job exists), API requests served per FineTuneJob, and the operator's peak RSS (VmHWM). The
baseline is the smallest N of the same run: the ratios show how the cost grows (linear growth
of the total and flat per-object latency would be ideal; 10x objects -> 10x total).

Usage: ``.venv/bin/python bench/operator_scale.py [--n 20 200] [--no-write]``; appends a section
to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubetune.k8s.client import KubeClient  # noqa: E402
from tests.plugins.kube import REQUEST_LOG, KubeApi  # noqa: E402

NS = "bench"


def ftj(name: str) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "baseModel": {"uri": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": f"s3://out/{name}"},
        },
    }


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_names(api: KubeApi) -> set[str]:
    """Names of the stored Jobs, read straight from the emulator's store (no HTTP, no copies)."""
    assert api.emulator is not None and api._loop is not None
    emulator = api.emulator

    async def snap() -> set[str]:
        return {
            name
            for (resource, _ns, name), obj in list(emulator.objects.items())
            if resource.plural == "jobs" and resource.group == "batch" and not obj.deleted
        }

    return asyncio.run_coroutine_threadsafe(snap(), api._loop).result(60)


async def wait_jobs(
    api: KubeApi, wanted: set[str], seen_at: dict[str, float], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        for name in job_names(api) & wanted:
            seen_at.setdefault(name, now)
        if wanted <= set(seen_at):
            return
        if now > deadline:
            missing = sorted(wanted - set(seen_at))
            raise TimeoutError(
                f"{len(missing)} Jobs still missing after {timeout}s, e.g. {missing[:3]}"
            )
        await asyncio.sleep(0.02)


async def run_one(n: int, timeout: float) -> dict:
    api = KubeApi().start(tempfile.mktemp(prefix="kubetune-bench-kubeconfig-", suffix=".yaml"))
    env = {**os.environ, "KUBECONFIG": api.kubeconfig}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "operator"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = KubeClient(api.url)
    try:
        # Warm-up: one object fully handled, so startup is not measured.
        await client.create(ftj("warmup"))
        await wait_jobs(api, {"warmup-validate"}, {}, timeout=60)
        requests_before = len(REQUEST_LOG)
        rss_before = peak_rss_mib(proc.pid)
        cpu_before = cpu_seconds(proc.pid)
        kmock_before = cpu_seconds(os.getpid())
        names = [f"ftj-{i:04d}" for i in range(n)]
        created_at: dict[str, float] = {}

        async def create(name: str) -> None:
            await client.create(ftj(name))
            created_at[name] = time.monotonic()

        t0 = time.monotonic()
        await asyncio.gather(*(create(name) for name in names))
        t_created = time.monotonic() - t0
        seen_at: dict[str, float] = {}
        await wait_jobs(api, {f"{name}-validate" for name in names}, seen_at, timeout)
        total = max(seen_at.values()) - t0
        operator_cpu = cpu_seconds(proc.pid) - cpu_before
        kmock_cpu = cpu_seconds(os.getpid()) - kmock_before
        latencies = sorted(seen_at[f"{name}-validate"] - created_at[name] for name in names)
        # Let the wave of follow-up events (status writes, Job ADDED) settle before reading RSS.
        await asyncio.sleep(1.0)
        requests = len(REQUEST_LOG) - requests_before
        return {
            "n": n,
            "create_s": t_created,
            "total_s": total,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[max(0, int(round(0.95 * len(latencies))) - 1)],
            "max_s": latencies[-1],
            "requests_per_ftj": requests / n,
            "operator_cpu_s": operator_cpu,
            "kmock_cpu_s": kmock_cpu,
            "rss_warm_mib": rss_before,
            "rss_peak_mib": peak_rss_mib(proc.pid),
        }
    finally:
        await client.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        api.stop()


def render(results: list[dict], command: str) -> str:
    base = results[0]
    lines = [
        f"## operator_scale ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {platform.node()} / {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}; "
        "kmock in-process over loopback HTTP, operator as a separate process (`kubetune operator`).",
        f"Command: `{command}`; load average at start: {os.getloadavg()[0]:.1f} (other sessions share the machine).",
        "",
        f"N FineTuneJobs created at once; time until each has its validate Job. Baseline: N={base['n']} of the same run.",
        "",
        "| N | all have a Job (s) | p50 (s) | p95 (s) | max (s) | API requests / FTJ | operator CPU (s) | kmock + bench CPU (s) | operator peak RSS (MiB) | total vs baseline | p95 vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']} | {r['total_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['max_s']:.2f} | "
            f"{r['requests_per_ftj']:.1f} | {r['operator_cpu_s']:.1f} | {r['kmock_cpu_s']:.1f} | {r['rss_peak_mib']:.0f} | "
            f"{r['total_s'] / base['total_s']:.1f}x | {r['p95_s'] / base['p95_s']:.1f}x |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, nargs="+", default=[20, 200], help="object counts (first = baseline)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait per N")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    results = []
    for n in args.n:
        r = asyncio.run(run_one(n, args.timeout))
        results.append(r)
        print(
            f"N={n}: all Jobs after {r['total_s']:.2f}s (creates took {r['create_s']:.2f}s); "
            f"per object p50 {r['p50_s']:.2f}s p95 {r['p95_s']:.2f}s max {r['max_s']:.2f}s; "
            f"{r['requests_per_ftj']:.1f} API requests/FTJ; operator CPU {r['operator_cpu_s']:.1f}s "
            f"(kmock + bench {r['kmock_cpu_s']:.1f}s) until all had a Job; operator peak RSS {r['rss_peak_mib']:.0f} MiB",
            flush=True,
        )
    base = results[0]
    for r in results[1:]:
        print(
            f"ratio N={r['n']} vs N={base['n']} ({r['n'] / base['n']:.0f}x objects): total {r['total_s'] / base['total_s']:.1f}x, "
            f"p95 {r['p95_s'] / base['p95_s']:.1f}x, peak RSS {r['rss_peak_mib'] / base['rss_peak_mib']:.2f}x"
        )
    text = render(results, " ".join([".venv/bin/python bench/operator_scale.py", *sys.argv[1:]]))
    if not args.no_write:
        with open(REPO / "bench" / "RESULTS.md", "a") as fh:
            fh.write("\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
