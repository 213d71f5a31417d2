"""Scaling a ModelDeployment on a real control plane: ``kubectl scale`` and a real HPA controller.

The chain: the CRD's scale subresource (kube-apiserver) -> ``spec.replicas`` -> the operator
(installed by the chart, running as pods, through RBAC) -> the revision's Deployment -> the
ReplicaSet controller's pods -> the node runner runs the real inference server.

Covered:
- ``kubectl scale mdep`` up and down: the stable Deployment follows, the operator keeps the
  new count (observedGeneration reaches it, spec.replicas is still what was written), and
  ``status.replicas`` follows the pods;
- ``GET .../scale`` (what the HPA controller and KEDA read) answers spec and status replicas and
  the selector, and that selector finds exactly the ModelDeployment's serving pods;
- the HPA of examples/autoscaling/hpa.yaml, created as it is (only its target's name and its
  bounds changed), is accepted by the API server and resolved by the real HPA controller,
  which runs with its own ServiceAccount: below minReplicas it scales the ModelDeployment
  through the scale subresource (the one rescale it makes without metrics; no metrics server
  runs here, so ScalingActive stays False for want of the custom metric), and the operator
  carries that count to the Deployment;
- ``kubectl scale --replicas=0`` with the HPA in place: the API server takes 0, the HPA
  controller turns itself off (ScalingDisabled) instead of scaling back up, the operator
  removes every pod and reports ScaledToZero.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from kubetune.k8s.client import KubeClient
from tests.cluster.conftest import REPO, Release, storage_secret
from tests.cluster.test_crds import kubectl
from tests.cluster.test_modeldeployment import MDEP, modeldeployment, phase
from tests.plugins.kube import condition, wait_for, wait_for_object

HPA = ("autoscaling/v2", "HorizontalPodAutoscaler")
NAME = "scaled"


def run_kubectl(kubeconfig: Path, *args: str) -> str:
    done = subprocess.run(
        [kubectl(), "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def scale_of(kubeconfig: Path, ns: str) -> dict[str, Any]:
    """The Scale object, read the way the HPA controller reads it."""
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/modeldeployments/{NAME}/scale"
    return json.loads(run_kubectl(kubeconfig, "get", "--raw", path))


async def stable_deployment(kube: KubeClient, ns: str) -> dict[str, Any]:
    md = await kube.get(*MDEP, ns, NAME)
    name = f"{NAME}-{md['status']['stable']['name']}"
    dep = await kube.get("apps/v1", "Deployment", ns, name)
    assert dep is not None, name
    return dep


async def settled_at(kube: KubeClient, ns: str, replicas: int, timeout: float = 180) -> dict:
    """The operator saw the count (observedGeneration) and the stable revision has that many pods."""

    async def probe() -> dict | None:
        md = await kube.get(*MDEP, ns, NAME)
        status = md.get("status") or {}
        if (
            md["spec"]["replicas"] == replicas
            and status.get("observedGeneration") == md["metadata"]["generation"]
            and status.get("replicas") == replicas
            and (await stable_deployment(kube, ns))["spec"]["replicas"] == replicas
        ):
            return md
        return None

    return await wait_for(probe, timeout=timeout, interval=0.5, what=f"{NAME} at {replicas} pods")


async def test_kubectl_scale_and_an_hpa_drive_the_modeldeployment(
    kubetune_release: Release,
    cluster_kube: KubeClient,
    cluster_namespace: str,
    cluster_assets: dict[str, str],
    cluster_kubeconfig: Path,
) -> None:
    ns, kube, kc = cluster_namespace, cluster_kube, cluster_kubeconfig
    await kube.create(storage_secret(ns))
    md = modeldeployment(NAME, ns, "unused", cluster_assets, mode="replicas")
    md["spec"]["model"] = {"baseModel": {"uri": cluster_assets["base"]}, "name": NAME}
    md["spec"]["replicas"] = 1
    await kube.create(md)
    md = await wait_for_object(kube, *MDEP, ns, NAME, lambda o: phase(o) == "Healthy", timeout=240)
    selector = md["status"]["selector"]
    assert selector == (
        f"kubetune.io/component=server,kubetune.io/kind=ModelDeployment,kubetune.io/owner={NAME}"
    )

    # kubectl scale writes spec.replicas through the subresource; the operator follows it.
    run_kubectl(kc, "scale", "-n", ns, f"mdep/{NAME}", "--replicas=2")
    md = await settled_at(kube, ns, 2)
    scale = scale_of(kc, ns)
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 2
    assert scale["status"]["replicas"] == 2
    assert scale["status"]["selector"] == selector
    pods = json.loads(run_kubectl(kc, "get", "pods", "-n", ns, "-l", selector, "-o", "json"))
    owners = {p["metadata"]["labels"]["kubetune.io/owner"] for p in pods["items"]}
    assert len(pods["items"]) == 2 and owners == {NAME}, pods["items"]

    run_kubectl(kc, "scale", "-n", ns, f"mdep/{NAME}", "--replicas=1")
    await settled_at(kube, ns, 1)
    assert scale_of(kc, ns)["spec"]["replicas"] == 1

    # The shipped HPA, aimed at this ModelDeployment; below minReplicas the HPA controller
    # scales it without waiting for metrics.
    (hpa,) = [
        d for d in yaml.safe_load_all((REPO / "examples/autoscaling/hpa.yaml").read_text()) if d
    ]
    hpa["metadata"] = {"name": NAME, "namespace": ns}
    hpa["spec"]["scaleTargetRef"]["name"] = NAME
    hpa["spec"].update(minReplicas=2, maxReplicas=3)
    await kube.create(hpa)
    md = await settled_at(kube, ns, 2)
    assert md["metadata"]["generation"] > 1

    def rescaled(o: dict) -> Any:
        able = condition(o, "AbleToScale") or {}
        return (o.get("status") or {}).get("currentReplicas") == 2 and able.get("status") == "True"

    got = await wait_for_object(kube, *HPA, ns, NAME, rescaled, timeout=120)
    assert got["status"]["desiredReplicas"] == 2
    # No custom metrics API here: the controller says so, and has not touched the count again.
    active = condition(got, "ScalingActive") or {}
    assert active.get("status") == "False", got["status"]
    assert (await kube.get(*MDEP, ns, NAME))["spec"]["replicas"] == 2

    # Scaled to zero by hand, with the HPA in place: the API server takes 0 through the
    # subresource (schema minimum and CEL rules), the HPA controller stands aside (autoscaling
    # is off while its target is at 0), and the operator removes every pod.
    run_kubectl(kc, "scale", "-n", ns, f"mdep/{NAME}", "--replicas=0")
    md = await settled_at(kube, ns, 0)
    assert phase(md) == "ScaledToZero", md["status"]
    assert condition(md, "Ready")["reason"] == "ScaledToZero"
    assert scale_of(kc, ns)["status"]["replicas"] == 0

    def disabled(o: dict) -> Any:
        return (condition(o, "ScalingActive") or {}).get("reason") == "ScalingDisabled"

    await wait_for_object(kube, *HPA, ns, NAME, disabled, timeout=120)
    assert (await kube.get(*MDEP, ns, NAME))["spec"]["replicas"] == 0

    async def no_pods() -> bool:
        return not await kube.list("v1", "Pod", ns, labels={"kubetune.io/owner": NAME})

    await wait_for(no_pods, timeout=120, interval=0.5, what="every serving pod gone")
