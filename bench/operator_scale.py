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

``--cluster`` adds, for each N, the same wave against a REAL control plane
(:mod:`tests.cluster.controlplane`: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, built by ``tests/cluster/controlplane/build.sh``) with kwok simulating four
nodes (``type=kwok``; kwok marks pods Running, they never complete). There the whole chain is
real: operator -> Job controller -> scheduler -> kwok. The operator authenticates as its own
user (client certificate ``kubetune-operator`` bound to cluster-admin) so that the API server's
priority-and-fairness metrics (flow schema ``global-default``) count its requests apart from the
control plane's, kwok's and the bench's (all of those use other flow schemas). Printed side by side with kmock: p50/p95
create -> validate Job, the time until all N are "running", API requests per FineTuneJob,
operator CPU and peak RSS, with the goals of issue 11 (p50 < 0.5 s, all running < 60 s,
RSS < 250 MB) and the ratio real/kmock; plus where the time goes (per-stage latencies, CPU of
every process over the wave, APF wait/execution of the operator's requests).

"Running" on the real cluster: with kwok the validate pod runs forever, so a FineTuneJob never
leaves data validation; its phase then is ``Validating`` (the operator sets phase ``Running``
only once a train Job exists, after validation succeeded). The honest equivalent of "all N
Running" is therefore: every FineTuneJob has ``status.phase == Validating`` AND its validate
pod is ``Running`` (its workload started). kmock has no Job controller, scheduler or kubelet:
its figure is "all N have phase Validating".

Usage: ``.venv/bin/python bench/operator_scale.py [--n 20 200] [--cluster] [--no-write]``;
appends a section to bench/RESULTS.md. The control plane's workdir is
``.kubetune/bench-cluster-<pid>/`` (removed afterwards unless ``--keep``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubetune.api.finetunejob import KIND  # noqa: E402
from kubetune.finetune import builders  # noqa: E402
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


def pct(sorted_values: list[float], q: float) -> float:
    """The q-quantile of an ascending list (nearest rank, as the kmock rows always used)."""
    return sorted_values[max(0, int(round(q * len(sorted_values))) - 1)]


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


def job_names(api: KubeApi) -> tuple[set[str], set[str]]:
    """Names of the stored Jobs and of the FineTuneJobs whose phase is Validating, read
    straight from the emulator's store (no HTTP, no copies)."""
    assert api.emulator is not None and api._loop is not None
    emulator = api.emulator

    async def snap() -> tuple[set[str], set[str]]:
        jobs, validating = set(), set()
        for (resource, _ns, name), obj in list(emulator.objects.items()):
            if obj.deleted:
                continue
            if resource.plural == "jobs" and resource.group == "batch":
                jobs.add(name)
            elif resource.plural == "finetunejobs":
                if ((obj.raw or {}).get("status") or {}).get("phase") == "Validating":
                    validating.add(name)
        return jobs, validating

    return asyncio.run_coroutine_threadsafe(snap(), api._loop).result(60)


async def wait_jobs(
    api: KubeApi,
    wanted: set[str],
    seen_at: dict[str, float],
    timeout: float,
    validating_at: dict[str, float] | None = None,
) -> None:
    """Poll until every Job in ``wanted`` exists (and, with ``validating_at``, every owner
    FineTuneJob has phase Validating), stamping the first time each was seen."""
    deadline = time.monotonic() + timeout
    owners = {name.removesuffix("-validate") for name in wanted}
    while True:
        now = time.monotonic()
        jobs, validating = job_names(api)
        for name in jobs & wanted:
            seen_at.setdefault(name, now)
        if validating_at is not None:
            for name in validating & owners:
                validating_at.setdefault(name, now)
        if wanted <= set(seen_at) and (validating_at is None or owners <= set(validating_at)):
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
        validating_at: dict[str, float] = {}
        await wait_jobs(
            api, {f"{name}-validate" for name in names}, seen_at, timeout, validating_at
        )
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
            "validating_s": max(validating_at.values()) - t0,
            "p50_s": statistics.median(latencies),
            "p95_s": pct(latencies, 0.95),
            "max_s": latencies[-1],
            "requests_per_ftj": requests / n,
            # REQUEST_LOG also holds the bench's own POST of each FineTuneJob.
            "operator_requests_per_ftj": (requests - n) / n,
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


# --------------------------------------------------------------------------------------------
# --cluster: the same wave against a real control plane, kwok simulating the nodes
# --------------------------------------------------------------------------------------------

GOALS = {"p50_s": 0.5, "running_s": 60.0, "rss_mib": 250 * 1000**2 / 1024**2}  # 250 MB
KWOK_NODES = 4
# Per fake node: room for 200 validate pods (1 CPU, 4Gi each) on 4 nodes, and 8 GPUs.
NODE_CAPACITY = {"cpu": "128", "memory": "1Ti", "pods": "250", "nvidia.com/gpu": "8"}
# kwok's own stages (sigs.k8s.io/kwok/kustomize/stage): nodes become Ready and renew their
# Lease; pods become Running and are removed once deleted. pod-complete is left out on
# purpose: the validate pods run forever, so FineTuneJobs stay in data validation.
KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-delete.yaml",
)
OPERATOR_USER = "kubetune-operator"
OPERATOR_FLOW_SCHEMA = "global-default"  # APF's flow schema for plain authenticated users


def kwok_stage_dir(bin_dir: Path) -> Path:
    """kustomize/stage of the kwok module the binary was built from (the Go module cache)."""
    match = re.search(r"kwok-(v[0-9][^_]*)", bin_dir.name)
    version = match.group(1) if match else "v0.8.0"
    roots = []
    if os.environ.get("GOMODCACHE"):
        roots.append(Path(os.environ["GOMODCACHE"]))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["go", "env", "GOMODCACHE"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
        if out:
            roots.append(Path(out))
    roots.append(Path.home() / "go" / "pkg" / "mod")
    for root in roots:
        folder = root / "sigs.k8s.io" / f"kwok@{version}" / "kustomize" / "stage"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"kwok {version} stages not found in the Go module cache ({roots})")


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format -> {(name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    label_re = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        try:
            out[(name, tuple(sorted(label_re.findall(labels))))] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(metrics: dict, name: str, **match: str) -> float:
    return sum(
        v
        for (n, labels), v in metrics.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    )


class Cluster:
    """Control plane + kwok + four fake nodes, started and stopped as one (no orphans)."""

    def __init__(self, workdir: Path) -> None:
        from tests.cluster.controlplane import ControlPlane
        from tests.plugins.cluster import install_crds

        self.workdir = workdir
        self.kwok: subprocess.Popen[bytes] | None = None
        self.cp = ControlPlane(workdir)
        self.cp.start()
        try:
            install_crds(self.cp, sorted((REPO / "crds").glob("*.yaml")))
            self._start_kwok()
            self._nodes()
            self._namespace(NS)
            self.operator_kubeconfig = self._operator_identity()
        except BaseException:
            self.stop()
            raise

    # -- setup --------------------------------------------------------------------------------

    def _start_kwok(self) -> None:
        from kubetune.local.containers import free_port
        from kubetune.local.processes import die_with_parent

        stages = kwok_stage_dir(self.cp.bin_dir)
        config = self.workdir / "kwok-stages.yaml"
        config.write_text("\n---\n".join((stages / s).read_text() for s in KWOK_STAGES))
        log = self.workdir / "logs" / "kwok.log"
        with open(log, "ab") as out:
            self.kwok = subprocess.Popen(
                [
                    str(self.cp.bin_dir / "kwok"),
                    f"--kubeconfig={self.cp.kubeconfig}",
                    f"--config={config}",
                    "--manage-all-nodes=false",
                    "--manage-nodes-with-label-selector=type=kwok",
                    "--node-lease-duration-seconds=40",
                    "--cidr=10.244.0.0/16",
                    f"--server-address=127.0.0.1:{free_port()}",
                    "--v=WARN",  # INFO logs every patch: CPU the cluster should not pay
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def _nodes(self, timeout: float = 90.0) -> None:
        for i in range(KWOK_NODES):
            name = f"kwok-node-{i}"
            self.cp.create(
                "/api/v1/nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": {
                            "type": "kwok",
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                        },
                        "annotations": {
                            "kwok.x-k8s.io/node": "fake",
                            "node.alpha.kubernetes.io/ttl": "0",
                        },
                    },
                    "status": {"capacity": NODE_CAPACITY, "allocatable": NODE_CAPACITY},
                },
            )
        deadline = time.monotonic() + timeout
        for i in range(KWOK_NODES):
            while True:
                assert self.kwok is not None
                if self.kwok.poll() is not None:
                    raise RuntimeError(f"kwok exited: {self.kwok_log()[-3000:]}")
                node = self.cp.get(f"/api/v1/nodes/kwok-node-{i}") or {}
                conds = {
                    c["type"]: c["status"] for c in node.get("status", {}).get("conditions") or []
                }
                taints = [t["key"] for t in node.get("spec", {}).get("taints") or []]
                if conds.get("Ready") == "True" and not taints:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"kwok-node-{i} not Ready: {conds} taints {taints}")
                time.sleep(0.3)

    def _namespace(self, name: str) -> None:
        self.cp.create(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )

    def _operator_identity(self) -> Path:
        """A client certificate of its own for the operator (user ``kubetune-operator``, no
        group but ``system:authenticated``) bound to cluster-admin, and its kubeconfig.

        Its own user puts its requests in APF's ``global-default`` flow schema, where no other
        client of this cluster lands (bench and kwok: admin, ``exempt``; the controllers:
        ``kube-system-service-accounts`` and ``kube-controller-manager``; the scheduler:
        ``kube-scheduler``). A ServiceAccount token would be the in-cluster way, but
        ``KubeClient.from_kubeconfig`` drops kubeconfig tokens with kubernetes-client 36
        (the loader files them under ``api_key["BearerToken"]``): the operator's own client
        then calls as ``system:anonymous``.
        """
        from tests.kubeconfig import write_kubeconfig

        cert, key = self.cp.pki.issue("kubetune-operator", OPERATOR_USER)
        self.cp.create(
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "kubetune-bench-operator"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "cluster-admin",
                },
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}
                ],
            },
        )
        return write_kubeconfig(
            self.workdir / "operator.kubeconfig",
            self.cp.server,
            self.cp.pki.ca_path,
            cert=cert,
            key=key,
            user=OPERATOR_USER,
        )

    # -- observation --------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cp.pki.ca_path))
        ctx.load_cert_chain(str(self.cp.admin_cert[0]), str(self.cp.admin_cert[1]))
        return ctx

    def metrics(self) -> dict:
        req = urllib.request.Request(self.cp.server + "/metrics", headers={"Accept": "text/plain"})
        with urllib.request.urlopen(req, context=self.ssl_context(), timeout=60) as resp:
            return parse_metrics(resp.read().decode())

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every control-plane process and of kwok."""
        out = {}
        for component in self.cp.components:
            if component.proc is not None and component.proc.poll() is None:
                out[component.name] = cpu_seconds(component.proc.pid)
        if self.kwok is not None and self.kwok.poll() is None:
            out["kwok"] = cpu_seconds(self.kwok.pid)
        return out

    def kwok_log(self) -> str:
        return (self.workdir / "logs" / "kwok.log").read_text(errors="replace")

    # -- stop ---------------------------------------------------------------------------------

    def stop(self) -> list[int]:
        """Stop kwok and the control plane; returns the process groups still alive (none)."""
        from kubetune.local.processes import group_alive

        groups = []
        if self.kwok is not None:
            groups.append(self.kwok.pid)
            stop_group(self.kwok)
        groups += self.cp.pids()
        self.cp.stop()
        return [g for g in groups if group_alive(g)]


def stop_group(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Signal a process started in its own session, then SIGKILL its whole group if needed."""
    from kubetune.local.processes import group_alive

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


class Watcher:
    """Watches Jobs, pods and FineTuneJobs of the bench namespace over HTTP (admin identity,
    so the bench's own requests stay out of the operator's flow schema) and stamps, per
    FineTuneJob, the first time each milestone is seen."""

    MILESTONES = ("job", "validating", "pod", "bound", "running")

    def __init__(self, cluster: Cluster) -> None:
        self.server = cluster.cp.server
        self.ssl = cluster.ssl_context()
        self.stamps: dict[str, dict[str, float]] = {m: {} for m in self.MILESTONES}
        self.tasks: list[asyncio.Task[None]] = []
        self.session: Any = None
        self.ready = 0
        self.restarts = 0

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
            headers={"User-Agent": "kubetune-bench", "Accept": "application/json"},
        )
        selector = f"labelSelector={builders.LABEL_KIND}%3D{KIND}"
        for path, handler in (
            (f"/apis/batch/v1/namespaces/{NS}/jobs?{selector}", self._job),
            (f"/api/v1/namespaces/{NS}/pods?{selector}", self._pod),
            (f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs?", self._ftj),
        ):
            self.tasks.append(asyncio.create_task(self._watch(path, handler)))
        deadline = time.monotonic() + 30
        while self.ready < len(self.tasks):
            if time.monotonic() > deadline:
                raise TimeoutError("watches did not start")
            for task in self.tasks:
                if task.done():
                    task.result()
            await asyncio.sleep(0.05)

    async def _watch(self, path: str, handler: Any) -> None:
        """Follow one watch; resume from the last resourceVersion when the API server ends it
        (it closes watchers that read too slowly for a burst: "unresponsiveness")."""
        rv = ""
        first = True
        deadline = time.monotonic() + 30
        while True:
            url = f"{self.server}{path}&watch=1&allowWatchBookmarks=true&timeoutSeconds=3600"
            if rv:
                url += f"&resourceVersion={rv}"
            resp = await self.session.get(url)
            if resp.status == 429 and time.monotonic() < deadline:
                # A CRD just Established: the watch cache is still initialising.
                resp.release()
                await asyncio.sleep(0.5)
                continue
            async with resp:
                if resp.status != 200:
                    raise RuntimeError(f"watch {path}: {resp.status} {await resp.text()}")
                if first:
                    self.ready += 1
                    first = False
                buf = b""
                async for chunk in resp.content.iter_any():
                    now = time.monotonic()
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind = event.get("type")
                        if kind == "ERROR":  # 410 Gone: start over (stamps keep the first)
                            rv = ""
                            continue
                        meta = (event.get("object") or {}).get("metadata") or {}
                        rv = meta.get("resourceVersion") or rv
                        if kind in ("ADDED", "MODIFIED"):
                            handler(event["object"], now)
            self.restarts += 1

    def _stamp(self, milestone: str, owner: str | None, now: float) -> None:
        if owner:
            self.stamps[milestone].setdefault(owner, now)

    def _job(self, obj: dict, now: float) -> None:
        name = obj["metadata"]["name"]
        if name.endswith("-validate"):
            self._stamp("job", name.removesuffix("-validate"), now)

    def _pod(self, obj: dict, now: float) -> None:
        labels = obj["metadata"].get("labels") or {}
        if labels.get(builders.LABEL_COMPONENT) != builders.COMPONENT_VALIDATE:
            return
        owner = labels.get(builders.LABEL_OWNER)
        self._stamp("pod", owner, now)
        if (obj.get("spec") or {}).get("nodeName"):
            self._stamp("bound", owner, now)
        if (obj.get("status") or {}).get("phase") == "Running":
            self._stamp("running", owner, now)

    def _ftj(self, obj: dict, now: float) -> None:
        if (obj.get("status") or {}).get("phase") == "Validating":
            self._stamp("validating", obj["metadata"]["name"], now)

    def missing(self, names: list[str]) -> dict[str, int]:
        return {
            m: sum(1 for n in names if n not in self.stamps[m])
            for m in self.MILESTONES
            if any(n not in self.stamps[m] for n in names)
        }

    async def wait(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.missing(names):
            for task in self.tasks:
                if task.done():
                    task.result()
                    raise RuntimeError("a watch ended early")
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout}s still missing: {self.missing(names)}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.session is not None:
            await self.session.close()


async def run_cluster(n: int, timeout: float, keep: bool = False) -> dict:
    """The wave of N FineTuneJobs against a fresh real control plane with kwok nodes."""
    from kubetune.local.processes import die_with_parent

    workdir = REPO / ".kubetune" / f"bench-cluster-{os.getpid()}" / f"n{n}"
    t_start = time.monotonic()
    cluster = await asyncio.to_thread(Cluster, workdir)
    startup = time.monotonic() - t_start
    env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    op_log = open(workdir / "logs" / "operator.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "operator"],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=op_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    client = KubeClient.from_kubeconfig(str(cluster.cp.kubeconfig))
    watcher = Watcher(cluster)
    try:
        await watcher.start()
        # Warm-up: one object all the way to a Running validate pod, so startup (Kopf's
        # discovery, the first watches, the scheduler's caches) is not measured.
        await client.create(ftj("warmup"))
        await watcher.wait(["warmup"], 120)
        await asyncio.sleep(1.0)  # the warm-up's follow-up events
        m_before = await asyncio.to_thread(cluster.metrics)
        cpu_before = {
            **cluster.cpu(),
            "operator": cpu_seconds(proc.pid),
            "bench": cpu_seconds(os.getpid()),
        }
        rss_warm = peak_rss_mib(proc.pid)
        names = [f"ftj-{i:04d}" for i in range(n)]
        created_at: dict[str, float] = {}

        async def create(name: str) -> None:
            await client.create(ftj(name))
            created_at[name] = time.monotonic()

        apiserver_log = workdir / "logs" / "kube-apiserver.log"
        log_offset = apiserver_log.stat().st_size
        t0 = time.monotonic()
        await asyncio.gather(*(create(name) for name in names))
        t_created = time.monotonic() - t0
        await watcher.wait(names, timeout)
        s = watcher.stamps
        t_all = time.monotonic()
        cpu_all = {
            **cluster.cpu(),
            "operator": cpu_seconds(proc.pid),
            "bench": cpu_seconds(os.getpid()),
        }
        await asyncio.sleep(2.0)  # the wave's follow-up events (status writes after Running)
        m_after = await asyncio.to_thread(cluster.metrics)
        events: dict[str, int] = {}
        for ev in (cluster.cp.get(f"/api/v1/namespaces/{NS}/events") or {}).get("items") or []:
            who = (ev.get("source") or {}).get("component") or ev.get("reportingComponent") or "?"
            key = f"{who} {ev.get('reason')}"
            events[key] = events.get(key, 0) + int(ev.get("count") or 1)
        latencies = sorted(s["job"][x] - created_at[x] for x in names)
        # Watches the API server closed as too slow for the burst (the log names the watch's
        # key: namespace-scoped = the bench's, cluster-wide = the operator's or a controller's).
        closed: dict[str, int] = {}
        with open(apiserver_log, "rb") as fh:
            fh.seek(log_offset)
            log = fh.read().decode(errors="replace")
        for match in re.finditer(
            r"Forcing (\S+) watcher close due to unresponsiveness: key: \"([^\"]*)\"", log
        ):
            scope = (
                f"namespace {NS}"
                if match.group(2).rstrip("/").endswith(f"/{NS}")
                else "cluster-wide"
            )
            key = f"{match.group(1)} ({scope})"
            closed[key] = closed.get(key, 0) + 1

        def stage(a: dict[str, float] | None, b: dict[str, float]) -> list[float]:
            return sorted(b[x] - (a[x] if a is not None else created_at[x]) for x in names)

        def delta(name: str, **match: str) -> float:
            return metric_sum(m_after, name, **match) - metric_sum(m_before, name, **match)

        flow = {"flow_schema": OPERATOR_FLOW_SCHEMA}
        op_requests = delta("apiserver_flowcontrol_dispatched_requests_total", **flow)
        exec_n = delta("apiserver_flowcontrol_request_execution_seconds_count", **flow)
        wait_n = delta("apiserver_flowcontrol_request_wait_duration_seconds_count", **flow)
        all_requests = delta("apiserver_request_total")
        by_flow: dict[str, float] = {}
        for (name, labels), value in m_after.items():
            if name == "apiserver_flowcontrol_dispatched_requests_total":
                schema = dict(labels).get("flow_schema", "?")
                got = value - m_before.get((name, labels), 0.0)
                by_flow[schema] = by_flow.get(schema, 0.0) + got
        by_verb: dict[str, float] = {}
        for (name, labels), value in m_after.items():
            if name == "apiserver_request_total":
                verb = dict(labels).get("verb", "?")
                by_verb[verb] = by_verb.get(verb, 0.0) + value - m_before.get((name, labels), 0.0)
        wall = t_all - t0
        return {
            "n": n,
            "startup_s": startup,
            "create_s": t_created,
            "total_s": max(s["job"][x] for x in names) - t0,
            "validating_s": max(s["validating"][x] for x in names) - t0,
            "pods_running_s": max(s["running"][x] for x in names) - t0,
            "running_s": max(max(s["running"][x], s["validating"][x]) for x in names) - t0,
            "p50_s": statistics.median(latencies),
            "p95_s": pct(latencies, 0.95),
            "max_s": latencies[-1],
            "stages": {
                "create -> validate Job (operator)": stage(None, s["job"]),
                "Job -> pod created (Job controller)": stage(s["job"], s["pod"]),
                "pod -> bound (scheduler)": stage(s["pod"], s["bound"]),
                "bound -> Running (kwok)": stage(s["bound"], s["running"]),
                "create -> FTJ phase Validating (operator)": stage(None, s["validating"]),
            },
            "operator_requests_per_ftj": op_requests / n,
            "requests_per_ftj": all_requests / n,
            "requests_by_verb": {k: v / n for k, v in sorted(by_verb.items()) if v},
            "requests_by_flow": {k: v / n for k, v in sorted(by_flow.items()) if v},
            "slow_watches_closed": closed,
            "bench_watch_restarts": watcher.restarts,
            "events_per_ftj": {
                k: v / (n + 1) for k, v in sorted(events.items(), key=lambda kv: -kv[1])
            },
            "apf_wait_ms": 1000
            * delta("apiserver_flowcontrol_request_wait_duration_seconds_sum", **flow)
            / max(wait_n, 1),
            "apf_exec_ms": 1000
            * delta("apiserver_flowcontrol_request_execution_seconds_sum", **flow)
            / max(exec_n, 1),
            "cpu_s": {k: cpu_all.get(k, 0.0) - v for k, v in cpu_before.items()},
            "wall_s": wall,
            "operator_cpu_s": cpu_all["operator"] - cpu_before["operator"],
            "rss_warm_mib": rss_warm,
            "rss_peak_mib": peak_rss_mib(proc.pid),
            "load": os.getloadavg()[0],
        }
    finally:
        await watcher.close()
        await client.close()
        stop_group(proc, signal.SIGINT, 30)
        op_log.close()
        left = await asyncio.to_thread(cluster.stop)
        if left:
            print(f"WARNING: process groups left behind: {left}", file=sys.stderr)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
            with contextlib.suppress(OSError):
                workdir.parent.rmdir()


def fmt_goal(value: float, goal: float, label: str | None = None) -> str:
    return f"< {label or f'{goal:g}'}: {'met' if value < goal else 'MISSED'}"


def compare_rows(k: dict, c: dict) -> list[tuple[str, str, str, str, str]]:
    """(metric, goal, kmock, real, real/kmock) rows for one N."""

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.2f}x" if a else "-"

    rss_goal = GOALS["rss_mib"]
    return [
        (
            "create -> validate Job, p50 (s)",
            fmt_goal(c["p50_s"], GOALS["p50_s"]),
            f"{k['p50_s']:.2f}",
            f"{c['p50_s']:.2f}",
            ratio(k["p50_s"], c["p50_s"]),
        ),
        (
            "create -> validate Job, p95 (s)",
            "",
            f"{k['p95_s']:.2f}",
            f"{c['p95_s']:.2f}",
            ratio(k["p95_s"], c["p95_s"]),
        ),
        (
            "all N have their validate Job (s)",
            "",
            f"{k['total_s']:.2f}",
            f"{c['total_s']:.2f}",
            ratio(k["total_s"], c["total_s"]),
        ),
        (
            "all N phase Validating (s)",
            "",
            f"{k['validating_s']:.2f}",
            f"{c['validating_s']:.2f}",
            ratio(k["validating_s"], c["validating_s"]),
        ),
        ("all N validate pods Running, kwok (s)", "", "n/a", f"{c['pods_running_s']:.2f}", "-"),
        (
            'all N "running": phase Validating + pod Running (s)',
            fmt_goal(c["running_s"], GOALS["running_s"]),
            f"{k['validating_s']:.2f} (Validating only)",
            f"{c['running_s']:.2f}",
            ratio(k["validating_s"], c["running_s"]),
        ),
        (
            "API requests / FTJ, operator only",
            "",
            f"{k['operator_requests_per_ftj']:.1f}",
            f"{c['operator_requests_per_ftj']:.1f}",
            ratio(k["operator_requests_per_ftj"], c["operator_requests_per_ftj"]),
        ),
        (
            "API requests / FTJ, all clients",
            "",
            f"{k['requests_per_ftj']:.1f}",
            f"{c['requests_per_ftj']:.1f}",
            ratio(k["requests_per_ftj"], c["requests_per_ftj"]),
        ),
        (
            "operator CPU (s) / per FTJ (ms)",
            "",
            f"{k['operator_cpu_s']:.1f} / {1000 * k['operator_cpu_s'] / k['n']:.0f}",
            f"{c['operator_cpu_s']:.1f} / {1000 * c['operator_cpu_s'] / c['n']:.0f}",
            ratio(k["operator_cpu_s"], c["operator_cpu_s"]),
        ),
        (
            "operator peak RSS (MiB)",
            fmt_goal(c["rss_peak_mib"], rss_goal, "238 MiB (250 MB)"),
            f"{k['rss_peak_mib']:.0f}",
            f"{c['rss_peak_mib']:.0f}",
            ratio(k["rss_peak_mib"], c["rss_peak_mib"]),
        ),
    ]


def cluster_detail(c: dict) -> list[str]:
    """Where the time goes on the real cluster, as markdown lines."""
    lines = [
        f"Real cluster, N={c['n']}: per-stage latency p50 / p95 / max (s):",
        "",
        "| stage | p50 | p95 | max |",
        "|---|---|---|---|",
    ]
    for label, values in c["stages"].items():
        lines.append(
            f"| {label} | {statistics.median(values):.2f} | {pct(values, 0.95):.2f} | {values[-1]:.2f} |"
        )
    cpu = c["cpu_s"]
    busy = sum(cpu.values())
    lines += [
        "",
        f"CPU seconds from the first create until all were running ({c['wall_s']:.1f} s wall, "
        f"{os.cpu_count()} CPUs = {c['wall_s'] * (os.cpu_count() or 1):.1f} CPU-s available, "
        f"these processes used {busy:.1f}; load average {c['load']:.1f}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])),
        "",
        f"Operator's requests at the API server (APF flow schema `{OPERATOR_FLOW_SCHEMA}`): mean queue wait "
        f"{c['apf_wait_ms']:.1f} ms, mean execution {c['apf_exec_ms']:.1f} ms. All clients' requests per FTJ by verb: "
        + ", ".join(f"{k} {v:.1f}" for k, v in c["requests_by_verb"].items())
        + "; by APF flow schema: "
        + ", ".join(f"{k} {v:.1f}" for k, v in c["requests_by_flow"].items())
        + ". Events in the namespace per FineTuneJob (warm-up included), by source and reason: "
        + ", ".join(f"{k} {v:.1f}" for k, v in c["events_per_ftj"].items())
        + '. Watches the API server closed as too slow for the burst ("unresponsiveness"; clients resume them): '
        + (", ".join(f"{k} {v}" for k, v in c["slow_watches_closed"].items()) or "none")
        + f" (the bench's own, resumed: {c['bench_watch_restarts']})"
        + f". Control plane + kwok start-up: {c['startup_s']:.0f} s (not measured).",
    ]
    return lines


def render_cluster(pairs: list[tuple[dict, dict]], command: str, load_at_start: float) -> str:
    lines = [
        f"## operator_scale --cluster ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {platform.node()} / {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}. "
        "kmock: in-process over loopback HTTP. Real: etcd + kube-apiserver + kube-controller-manager + kube-scheduler "
        f"(tests/cluster/controlplane.py) with kwok simulating {KWOK_NODES} nodes (pods become Running, never complete); "
        "the operator as a separate process (`kubetune operator`) in both, on the real one as its own user (client certificate bound to cluster-admin).",
        f"Command: `{command}`; load average {load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end "
        "(other sessions share the machine).",
        "",
        '"Running" on the real cluster = FineTuneJob phase `Validating` and its validate pod Running: with kwok the '
        "validate pod never completes, and the operator sets phase `Running` only once training starts after a "
        "successful validation. kmock has no Job controller, scheduler or kubelet: its figure is phase `Validating` only. "
        "Operator-only requests: real = the API server's APF counter for the operator's flow schema; kmock = all requests "
        "minus the bench's one POST per FTJ. All clients (real) includes the Job controller, scheduler, kwok and the bench.",
        "",
    ]
    for k, c in pairs:
        lines += [
            f"N={c['n']} FineTuneJobs created at once:",
            "",
            "| metric | goal (issue 11) | kmock | real API server | real / kmock |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {' | '.join(row)} |" for row in compare_rows(k, c)]
        lines += [""] + cluster_detail(c) + [""]
    return "\n".join(lines)


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
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also run each N against a real control plane with kwok nodes, side by side",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the control plane's workdir (logs) afterwards"
    )
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    results = []
    pairs = []
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
        if args.cluster:
            c = asyncio.run(run_cluster(n, args.timeout, keep=args.keep))
            pairs.append((r, c))
            print(f"N={n} real API server + kwok vs kmock:")
            for row in compare_rows(r, c):
                print(f"  {row[0]}: kmock {row[2]}, real {row[3]} (real/kmock {row[4]}) {row[1]}")
            print("  " + "\n  ".join(line for line in cluster_detail(c) if line), flush=True)
    base = results[0]
    for r in results[1:]:
        print(
            f"ratio N={r['n']} vs N={base['n']} ({r['n'] / base['n']:.0f}x objects): total {r['total_s'] / base['total_s']:.1f}x, "
            f"p95 {r['p95_s'] / base['p95_s']:.1f}x, peak RSS {r['rss_peak_mib'] / base['rss_peak_mib']:.2f}x"
        )
    command = " ".join([".venv/bin/python bench/operator_scale.py", *sys.argv[1:]])
    text = (
        render_cluster(pairs, command, load_at_start) if args.cluster else render(results, command)
    )
    if not args.no_write:
        with open(REPO / "bench" / "RESULTS.md", "a") as fh:
            fh.write("\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
