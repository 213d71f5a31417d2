"""The node runner does what a kubelet does for the pods the tier runs (plain Pods, no operator).

- two pods serving the same port each get their own address, are Ready by their readiness
  probe, and answer on ``podIP:port``; the EndpointSlice controller publishes them;
- a container that fails is restarted under ``OnFailure``: ``restartCount``, ``lastState`` with
  the exit code and the termination message, then Succeeded;
- deleting a pod sends SIGTERM and waits the grace period before the pod is gone;
- a startup probe holds Ready (and ``started``) back until it succeeds, and one that never does
  gets its container killed and restarted: the chart's operator and the serving pods have
  startup probes, so their paths and ports are checked against the real processes;
- a pod that cannot be set up yet (its Secret does not exist) waits with
  ``CreateContainerConfigError`` and starts once the Secret exists, as with a kubelet. The runner
  once made any set-up failure final: a pod whose TokenRequest timed out on a loaded machine
  never ran, and the chart's operator Deployment stayed 1/2 available.
"""

from __future__ import annotations

import textwrap
import urllib.request
from pathlib import Path
from typing import Any

from kubetune.k8s.client import KubeClient
from tests.cluster.controlplane import ControlPlane
from tests.plugins.kube import wait_for, wait_for_object


def pod(namespace: str, name: str, script: str, **spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "python:3.11-slim",  # the runner runs the command on the host's interpreter
        "command": ["python", "-c", textwrap.dedent(script)],
        **spec.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "probe-test"}},
        "spec": {"containers": [container], "restartPolicy": "Never", **spec},
    }


def ready(obj: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
    return conds.get("Ready") == "True"


async def test_pods_on_the_same_port_get_their_own_address_and_readiness(
    cluster_nodes: Any, cluster_kube: KubeClient, cluster_namespace: str
) -> None:
    ns, kube = cluster_namespace, cluster_kube
    serve = "import http.server as h; h.ThreadingHTTPServer(('0.0.0.0', 8000), h.SimpleHTTPRequestHandler).serve_forever()"
    probe = {"readinessProbe": {"httpGet": {"path": "/", "port": 8000}, "periodSeconds": 1}}
    await kube.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "same-port", "namespace": ns},
            "spec": {
                "selector": {"app": "probe-test"},
                "ports": [{"port": 80, "targetPort": 8000}],
            },
        }
    )
    for name in ("a", "b"):
        await kube.create(
            pod(ns, name, serve, container={"ports": [{"containerPort": 8000}], **probe})
        )
    ips = []
    for name in ("a", "b"):
        obj = await wait_for_object(kube, "v1", "Pod", ns, name, ready, timeout=60)
        ips.append(obj["status"]["podIP"])
        with urllib.request.urlopen(f"http://{obj['status']['podIP']}:8000/", timeout=10) as resp:
            assert resp.status == 200
    assert len(set(ips)) == 2, ips

    async def published() -> list[str]:
        slices = await kube.list(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            ns,
            labels={"kubernetes.io/service-name": "same-port"},
        )
        found = sorted(a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"])
        return found if found == sorted(ips) else []

    await wait_for(published, timeout=30, what="both pods in the Service's EndpointSlice")


async def test_failed_container_is_restarted_with_its_last_state_and_termination_message(
    control_plane: ControlPlane,
    cluster_nodes: Any,
    cluster_kube: KubeClient,
    cluster_namespace: str,
) -> None:
    ns, kube = cluster_namespace, cluster_kube
    counter = control_plane.workdir / f"{ns}-attempts"
    script = f"""
        import pathlib, sys
        counter = pathlib.Path({str(counter)!r})
        attempt = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(attempt))
        pathlib.Path('/dev/termination-log').write_text(f'attempt {{attempt}}')
        sys.exit(3 if attempt == 1 else 0)
    """
    await kube.create(pod(ns, "flaky", script, restartPolicy="OnFailure"))
    obj = await wait_for_object(
        kube,
        "v1",
        "Pod",
        ns,
        "flaky",
        lambda o: (o.get("status") or {}).get("phase") == "Succeeded",
        timeout=60,
    )
    status = obj["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert status["lastState"]["terminated"]["message"] == "attempt 1"
    assert status["state"]["terminated"] == {
        **status["state"]["terminated"],
        "exitCode": 0,
        "message": "attempt 2",
    }


async def test_deleted_pod_gets_sigterm_and_its_grace_period(
    control_plane: ControlPlane,
    cluster_nodes: Any,
    cluster_kube: KubeClient,
    cluster_namespace: str,
) -> None:
    ns, kube = cluster_namespace, cluster_kube
    marker = control_plane.workdir / f"{ns}-term"
    script = f"""
        import pathlib, signal, sys, time
        def term(*_):
            time.sleep(1)  # a short drain, well inside the grace period
            pathlib.Path({str(marker)!r}).write_text('drained after SIGTERM')
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        pathlib.Path('/dev/termination-log').write_text('started')
        while True:
            time.sleep(0.1)
    """
    await kube.create(pod(ns, "drains", script, terminationGracePeriodSeconds=20))
    await wait_for_object(
        kube, "v1", "Pod", ns, "drains", lambda o: (o.get("status") or {}).get("phase") == "Running"
    )
    await kube.delete("v1", "Pod", ns, "drains")

    async def gone() -> bool:
        return await kube.get("v1", "Pod", ns, "drains") is None

    await wait_for(
        gone, timeout=30, interval=0.2, what="the pod removed after its processes stopped"
    )
    assert Path(marker).read_text() == "drained after SIGTERM"


async def test_pod_waits_for_a_missing_secret_and_starts_once_it_exists(
    cluster_nodes: Any, cluster_kube: KubeClient, cluster_namespace: str
) -> None:
    """Set-up failures are retried (kubelet back-off), not final: regression of the node runner."""
    ns, kube = cluster_namespace, cluster_kube
    script = """
        import os, pathlib
        pathlib.Path('/dev/termination-log').write_text(os.environ['LATE'])
    """
    env = [{"name": "LATE", "valueFrom": {"secretKeyRef": {"name": "late", "key": "KT_LATE_KEY"}}}]
    await kube.create(pod(ns, "waits", script, container={"env": env}))

    def waiting_reason(obj: dict[str, Any]) -> str:
        statuses = (obj.get("status") or {}).get("containerStatuses") or [{}]
        return ((statuses[0].get("state") or {}).get("waiting") or {}).get("message", "")

    obj = await wait_for_object(
        kube, "v1", "Pod", ns, "waits", lambda o: "late" in waiting_reason(o), timeout=60
    )
    state = obj["status"]["containerStatuses"][0]["state"]["waiting"]
    assert state["reason"] == "CreateContainerConfigError", state
    assert obj["status"]["phase"] == "Pending"
    await kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "late", "namespace": ns},
            "stringData": {"KT_LATE_KEY": "created after its pod"},
        }
    )
    obj = await wait_for_object(
        kube,
        "v1",
        "Pod",
        ns,
        "waits",
        lambda o: (o.get("status") or {}).get("phase") in ("Succeeded", "Failed"),
        timeout=60,
    )
    terminated = obj["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (obj["status"]["phase"], terminated.get("message")) == (
        "Succeeded",
        "created after its pod",
    ), obj["status"]


async def test_startup_probe_holds_ready_back_and_a_failing_one_restarts_the_container(
    control_plane: ControlPlane,
    cluster_nodes: Any,
    cluster_kube: KubeClient,
    cluster_namespace: str,
) -> None:
    ns, kube = cluster_namespace, cluster_kube
    go = control_plane.workdir / f"{ns}-go"
    serve = f"""
        import http.server as h, pathlib, time
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.1)
        h.ThreadingHTTPServer(('0.0.0.0', 8000), h.SimpleHTTPRequestHandler).serve_forever()
    """
    startup = {
        "httpGet": {"path": "/", "port": "http"},
        "periodSeconds": 1,
        "failureThreshold": 600,
    }
    ports = [{"name": "http", "containerPort": 8000}]
    await kube.create(
        pod(
            ns,
            "late",
            serve,
            restartPolicy="Always",
            container={"ports": ports, "startupProbe": startup},
        )
    )
    obj = await wait_for_object(
        kube, "v1", "Pod", ns, "late", lambda o: (o.get("status") or {}).get("phase") == "Running"
    )
    status = obj["status"]["containerStatuses"][0]
    # Not listening until the test says so: neither started nor Ready.
    assert (status["started"], status["ready"], ready(obj)) == (False, False, False), obj["status"]
    go.write_text("go")
    obj = await wait_for_object(kube, "v1", "Pod", ns, "late", ready, timeout=60)
    assert obj["status"]["containerStatuses"][0]["started"] is True

    # A startup probe aimed at a port nothing serves: killed after 2 x 1 s, then restarted.
    wrong = {"httpGet": {"path": "/", "port": 8001}, "periodSeconds": 1, "failureThreshold": 2}
    await kube.create(
        pod(
            ns,
            "never",
            serve,
            restartPolicy="Always",
            terminationGracePeriodSeconds=2,
            container={"ports": ports, "startupProbe": wrong},
        )
    )
    obj = await wait_for_object(
        kube,
        "v1",
        "Pod",
        ns,
        "never",
        lambda o: (
            ((o.get("status") or {}).get("containerStatuses") or [{}])[0].get("restartCount", 0)
            >= 1
        ),
        timeout=60,
    )
    status = obj["status"]["containerStatuses"][0]
    assert "terminated" in status["lastState"] and not ready(obj), obj["status"]
