"""Pytest plugin: a real Kubernetes control plane and a node that runs pods, for the ``cluster`` tier.

Fixtures (session scope: one control plane for the whole run, as envtest does):

- ``control_plane``: etcd + kube-apiserver + kube-controller-manager + kube-scheduler on
  127.0.0.1 (:mod:`tests.cluster.controlplane`), with ``crds/`` and the Gateway API CRDs
  installed and Established. Its start-up time is written to
  ``.kubetune/test-artifacts/cluster-startup.json``.
- ``cluster_nodes``: the pod runner (:mod:`tests.cluster.noderunner`) as a subprocess with two
  nodes, ``cpu-0`` and ``gpu-0`` (8 ``nvidia.com/gpu``, tainted ``nvidia.com/gpu:NoSchedule``),
  both Ready.

Per test:

- ``cluster_namespace``: a fresh namespace, deleted afterwards;
- ``cluster_kube``: an admin :class:`~kubetune.k8s.client.KubeClient` in the test's loop.

Every process the tier starts is in its own session with ``PR_SET_PDEATHSIG``; at session end
the fixtures stop them and check that none is left (the same no-orphan rule as
``kubetune local``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.k8s.client import KubeClient
from kubetune.local.processes import die_with_parent, group_alive, read_registry
from tests.cluster.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO / ".kubetune" / "cluster"
ARTIFACTS = REPO / ".kubetune" / "test-artifacts"
NODES = (("cpu-0", "cpu"), ("gpu-0", "gpu"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cluster: needs the real control plane (built once per machine; see docs/testing.md)",
    )


# Container mode's hang guard: pytest-timeout's (pyproject.toml, 600 s) times this factor.
CONTAINER_MODE_TIMEOUT_FACTOR = 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/cluster/ is the ``cluster`` tier.

    In container mode (``KUBETUNE_CLUSTER_IMAGES=1``) a cluster test without its own
    ``timeout`` mark gets twice the suite's: each pod start there is a ``podman run`` and a
    cold interpreter in a read-only image, and the ModelDeployment story (two trainings, three
    serving revisions) measured 570 s to its last step on a machine at load 9, against 600 s
    for the whole test. Every step keeps its own wait (``wait_for_object(timeout=...)``): the
    mark only moves the guard against a hang, not what a step may take.
    """
    root = REPO / "tests" / "cluster"
    images = os.environ.get("KUBETUNE_CLUSTER_IMAGES") == "1"
    guard = float(config.getini("timeout") or 600) * CONTAINER_MODE_TIMEOUT_FACTOR
    for item in items:
        if root in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)
            if images and item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(guard))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def install_crds(cp: ControlPlane, files: list[Path], timeout: float = 60.0) -> list[str]:
    """Create each CRD and wait until the API server says Established; returns their names."""
    names = []
    for path in files:
        for doc in _docs(path):
            if doc.get("kind") != "CustomResourceDefinition":
                continue  # the Gateway API bundle also ships a ValidatingAdmissionPolicy
            status, body = cp.request(
                "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc
            )
            if status >= 300 and status != 409:
                raise AssertionError(
                    f"{path}: the API server refused the CRD: {status} {body.get('message') if isinstance(body, dict) else body}"
                )
            names.append(doc["metadata"]["name"])
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = cp.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conds = {c["type"]: c for c in (crd or {}).get("status", {}).get("conditions") or []}
            if conds.get("Established", {}).get("status") == "True":
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"CRD {name} not Established: {conds}")
            time.sleep(0.1)
    return names


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """The real control plane, with our CRDs and the Gateway API CRDs installed."""
    workdir = CLUSTER_DIR / f"run-{os.getpid()}"
    cp = ControlPlane(workdir).start()
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "cluster-startup.json").write_text(
            json.dumps(
                {"startup_seconds": round(cp.startup_seconds, 2), "bin_dir": str(cp.bin_dir)}
            )
        )
        install_crds(cp, sorted((REPO / "crds").glob("*.yaml")))
        install_crds(cp, sorted((cp.bin_dir / "gateway-api").glob("*.yaml")))
        yield cp
    finally:
        pids = cp.pids()
        cp.stop()
        left = [p for p in pids if group_alive(p)]
        assert not left, f"control-plane processes left behind: {left}"
        if not os.environ.get("KUBETUNE_KEEP_CLUSTER_DIR"):
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


class NodeRunnerProcess:
    """The pod runner subprocess (see :mod:`tests.cluster.noderunner`)."""

    def __init__(self, cp: ControlPlane, nodes: tuple[tuple[str, str], ...] = NODES) -> None:
        self.cp = cp
        self.nodes = nodes
        self.workdir = cp.workdir / "noderunner"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = cp.workdir / "logs" / "noderunner.log"
        argv = [
            sys.executable,
            "-m",
            "tests.cluster.noderunner",
            "--kubeconfig",
            str(cp.kubeconfig),
            "--workdir",
            str(self.workdir),
            "--subnet",
            str(os.getpid() % 200),  # two sessions' runners never hand out the same address
        ]
        for name, kind in nodes:
            argv += ["--node", f"{name}:{kind}"]
        if os.environ.get("KUBETUNE_CLUSTER_IMAGES") == "1":
            argv.append("--images")  # container mode: pods run in the images (make images)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name, _ in self.nodes:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"noderunner exited: {self.log.read_text()[-3000:]}")
                node = self.cp.get(f"/api/v1/nodes/{name}")
                conds = {
                    c["type"]: c["status"]
                    for c in (node or {}).get("status", {}).get("conditions") or []
                }
                taints = [t["key"] for t in (node or {}).get("spec", {}).get("taints") or []]
                if conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"node {name} not Ready: {node}")
                time.sleep(0.2)

    def pod_processes(self) -> list[int]:
        """Process groups of pods still registered by the runner."""
        return [int(e["pid"]) for e in read_registry(self.workdir / "processes.json")]

    def stop(self, timeout: float = 60.0) -> None:
        pods = self.pod_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        left = [p for p in pods if group_alive(p)]
        for pgid in left:
            os.killpg(pgid, signal.SIGKILL)
        assert not left, f"pod processes left behind by the noderunner: {left}"


def describe_pods(cp: ControlPlane, namespace: str, runner: NodeRunnerProcess | None = None) -> str:
    """What ``kubectl describe pods`` would say first, plus the runner's last log lines.

    For a failure message: the phase, conditions and container states (with their reasons and
    messages) of each pod in ``namespace``, so a wait that timed out names its cause.
    """
    pods = (cp.get(f"/api/v1/namespaces/{namespace}/pods") or {}).get("items") or []
    lines = [f"pods in {namespace}: {len(pods)}"]
    for pod in pods:
        status = pod.get("status") or {}
        conds = " ".join(f"{c['type']}={c['status']}" for c in status.get("conditions") or [])
        lines.append(
            f"- {pod['metadata']['name']} node={pod['spec'].get('nodeName')} "
            f"phase={status.get('phase')} {conds} {status.get('message', '')}".rstrip()
        )
        for c in status.get("containerStatuses") or []:
            lines.append(
                f"  {c['name']}: ready={c.get('ready')} restarts={c.get('restartCount')} "
                f"state={json.dumps(c.get('state'))[:600]} last={json.dumps(c.get('lastState'))[:300]}"
            )
    if runner is not None and runner.log.exists():
        tail = runner.log.read_text(errors="replace").splitlines()[-40:]
        lines += ["noderunner log (last 40 lines):", *tail]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def cluster_nodes(control_plane: ControlPlane) -> Iterator[NodeRunnerProcess]:
    """Two Ready nodes whose pods really run (cpu-0, and gpu-0 with 8 GPUs and the GPU taint)."""
    runner = NodeRunnerProcess(control_plane)
    try:
        runner.wait_ready()
        yield runner
    finally:
        runner.stop()


@pytest.fixture()
def cluster_namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test (deleted afterwards; the namespace controller empties it)."""
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    control_plane.create(
        "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    deadline = time.monotonic() + 30
    while control_plane.get(f"/api/v1/namespaces/{name}/serviceaccounts/default") is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"namespace {name}: no default ServiceAccount")
        time.sleep(0.1)
    try:
        yield name
    finally:
        control_plane.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture()
async def cluster_kube(control_plane: ControlPlane):
    """An admin API client (client certificate in system:masters) in the test's event loop."""
    client = KubeClient.from_kubeconfig(str(control_plane.kubeconfig))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture()
def cluster_kubeconfig(control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG -> the admin kubeconfig for the test (kubectl and Kopf read it)."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(control_plane.kubeconfig))
    return control_plane.kubeconfig
