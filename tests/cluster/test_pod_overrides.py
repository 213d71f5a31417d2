"""spec.podTemplate, imagePullSecrets and serviceAccountName on the real API server.

- A FineTuneJob with a podTemplate override (labels, annotations, nodeSelector, affinity,
  tolerations, topology spread, an extra volume and mount, extra env, a native sidecar),
  imagePullSecrets and a serviceAccountName whose account carries a registry secret: the
  operator (installed by the chart) creates Jobs the API server accepts, their pods carry every
  override, the per-job ServiceAccount carries the named account's pull secret, the pods really
  run (the sidecar first) and the job Succeeds.
- The children the builders make from a maximal override of both kinds (an Indexed multi-node
  train Job, a serving Deployment) pass a server-side dry run with strict field validation.
- A refused override is refused by the API server itself, naming the field.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from kubetune.api.common import API_VERSION
from kubetune.finetune import builders as fb
from kubetune.k8s.client import KubeClient
from kubetune.rollout import builders as rb
from kubetune.rollout.revisions import Revision
from tests.cluster.conftest import Release, storage_secret
from tests.cluster.controlplane import ControlPlane
from tests.cluster.test_finetunejob import FTJ, finetunejob, pods_of
from tests.cluster.test_names import dry_run
from tests.plugins.kube import condition, wait_for, wait_for_object
from tests.unit.test_pod_overrides import FULL_OVERRIDE, make_ftj, make_md

OVERRIDE: dict[str, Any] = {
    "labels": {"team": "nlp", "example.com/cost-center": "42"},
    "annotations": {"example.com/owner": "platform"},
    # Both test nodes have it: the pods still schedule (cpu-0 validates, gpu-0 trains).
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "affinity": {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 1,
                    "preference": {
                        "matchExpressions": [
                            {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}
                        ]
                    },
                }
            ]
        }
    },
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ],
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"team": "nlp"}},
        }
    ],
    "volumes": [{"name": "scratch", "emptyDir": {}}],
    "volumeMounts": [{"name": "scratch", "mountPath": "/var/tmp/kubetune-scratch"}],
    "env": [{"name": "TEAM", "value": "nlp"}],
    "sidecars": [
        {
            "name": "hello",
            "image": "busybox:1.36",
            # The node runner runs it as a process; a native sidecar that exits 0 at once is
            # enough to show it ran before the trainer.
            "command": ["python", "-c", "print('sidecar up')"],
            "volumeMounts": [{"name": "scratch", "mountPath": "/var/tmp/kubetune-scratch"}],
        }
    ],
}


def _check_pod_template(template: dict[str, Any], container: str) -> None:
    """Every override of OVERRIDE is in this pod template (a Job's or a live pod's)."""
    meta, pod = template["metadata"], template["spec"]
    assert meta["labels"]["team"] == "nlp" and meta["labels"]["example.com/cost-center"] == "42"
    assert meta["labels"]["kubetune.io/owner"] == "overridden"
    assert meta["annotations"]["example.com/owner"] == "platform"
    assert pod["nodeSelector"]["kubernetes.io/os"] == "linux"
    assert pod["affinity"] == OVERRIDE["affinity"]
    assert OVERRIDE["tolerations"][0] in pod["tolerations"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert {"name": "regcred"} in pod["imagePullSecrets"]
    main = next(c for c in pod["containers"] if c["name"] == container)
    assert {"name": "TEAM", "value": "nlp"} in main["env"]
    assert any(m["name"] == "scratch" for m in main["volumeMounts"])
    sidecar = pod["initContainers"][0]
    assert sidecar["name"] == "hello" and sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False


async def test_a_finetunejob_with_overrides_gets_children_that_carry_them_and_succeeds(
    control_plane: ControlPlane,
    kubetune_release: Release,
    cluster_kube: KubeClient,
    cluster_namespace: str,
    cluster_assets: dict[str, str],
) -> None:
    ns, kube = cluster_namespace, cluster_kube
    await kube.create(storage_secret(ns))
    await kube.create(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "ml-team", "namespace": ns},
            "imagePullSecrets": [{"name": "team-registry"}],
        }
    )
    ftj = finetunejob("overridden", ns, cluster_assets, steps=4)
    ftj["spec"].update(
        podTemplate=OVERRIDE, imagePullSecrets=[{"name": "regcred"}], serviceAccountName="ml-team"
    )
    await kube.create(ftj)

    validate = await wait_for_object(kube, "batch/v1", "Job", ns, "overridden-validate", timeout=60)
    _check_pod_template(validate["spec"]["template"], "validate")
    # The per-job account stands in for ml-team: its registry secret, then its RoleBinding.
    account = await wait_for_object(kube, "v1", "ServiceAccount", ns, "overridden-trainer")
    assert account["imagePullSecrets"] == [{"name": "team-registry"}]

    async def validate_pod() -> dict[str, Any] | None:
        found = await pods_of(kube, ns, "overridden-validate")
        return found[0] if found else None

    pod = await wait_for(validate_pod, timeout=60, what="the validate Job's pod")
    # The pod as the API server admitted it (ServiceAccount admission, defaults) keeps them all;
    # with pull secrets of its own, the account's are not added (Kubernetes' rule).
    _check_pod_template(pod, "validate")
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["serviceAccountName"] == "overridden-trainer"

    async def done() -> dict[str, Any] | None:
        obj = await kube.get(*FTJ, ns, "overridden")
        phase = (obj.get("status") or {}).get("phase")
        return obj if phase in ("Succeeded", "Failed") else None

    try:
        final = await wait_for(done, timeout=300, interval=1.0, what="the FineTuneJob to finish")
    except AssertionError:
        # Say where it stood: the job's status and every pod's.
        obj = await kube.get(*FTJ, ns, "overridden")
        pods = await kube.list("v1", "Pod", ns)
        states = {p["metadata"]["name"]: p.get("status") for p in pods}
        raise AssertionError(
            f"not finished: {json.dumps(obj.get('status'), indent=1)}\npods: {json.dumps(states, indent=1)}"
        ) from None
    assert final["status"]["phase"] == "Succeeded", json.dumps(final["status"], indent=1)
    assert condition(final, "Succeeded")["status"] == "True"
    train = await kube.get("batch/v1", "Job", ns, "overridden-train")
    _check_pod_template(train["spec"]["template"], "trainer")
    # The GPU pod also keeps kubetune's own GPU toleration beside the override's.
    tolerations = train["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    train_pods = await pods_of(kube, ns, "overridden-train")
    assert train_pods and train_pods[0]["spec"]["nodeName"] == "gpu-0"


def test_children_of_a_maximal_override_pass_a_strict_dry_run(
    control_plane: ControlPlane, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    extra = {"podTemplate": FULL_OVERRIDE, "imagePullSecrets": [{"name": "regcred"}]}
    ftj = make_ftj(nodes=2, resources={"gpus": 2}, serviceAccountName="ml-team", **extra)
    md = make_md(serviceAccountName="serving", **extra)
    revision = Revision("abc123def0", "s3://models/base", None, None, None, "chat", "server:1")
    children = [
        fb.build_validate_job(ftj),
        fb.build_train_job(ftj, attempt=1),
        *fb.build_trainer_rbac(ftj, image_pull_secrets=[{"name": "team-registry"}]),
        rb.build_server_deployment(md, revision, role=rb.ROLE_CANARY),
    ]
    refused = []
    for child in children:
        child = copy.deepcopy(child)
        child["metadata"]["namespace"] = ns
        child["metadata"].pop("ownerReferences", None)
        status, message = dry_run(control_plane, child)
        if status >= 300:
            refused.append(f"{child['kind']} {child['metadata']['name']}: {message}")
    assert not refused, "\n".join(refused)


def test_the_api_server_refuses_an_override_of_what_kubetune_sets(
    control_plane: ControlPlane, cluster_namespace: str
) -> None:
    ftj = make_ftj(
        podTemplate={
            "env": [{"name": "KUBETUNE_SPEC", "value": "{}"}],
            "labels": {"kubetune.io/owner": "x"},
        }
    )
    ftj["metadata"] = {"name": "refused", "namespace": cluster_namespace}
    path = f"/apis/{API_VERSION}/namespaces/{cluster_namespace}/finetunejobs?dryRun=All&fieldValidation=Strict"
    status, body = control_plane.request("POST", path, ftj)
    assert status == 422, body
    message = body.get("message", "")
    assert "spec.podTemplate.env[0].name" in message and "is set by kubetune" in message, message
    assert "spec.podTemplate.labels" in message, message
