"""A FineTuneJob on a real control plane, end to end, with the operator installed by its chart.

The chain a user sees: ``kubectl apply`` a FineTuneJob -> the operator (two replicas, running as
pods with the chart's ServiceAccount) creates the validate Job -> the Job controller creates its
pod -> the scheduler binds it to the CPU node -> the node runner runs the real trainer
(``python -m kubetune_trainer validate``) -> the train Job, on the GPU node (toleration and
``nvidia.com/gpu`` request scheduled for real) -> the trainer reports progress into status
through its own token, checked by the RBAC authorizer -> Succeeded with the artifact in moto's
S3, Events and conditions; ``kubectl wait --for=condition=Succeeded`` returns.

Then: deleting the FineTuneJob garbage-collects everything it owns; a trainer killed with
SIGKILL mid-run resumes from its last checkpoint; the active operator replica deleted mid-run
is replaced by the standby and nothing is created twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.common import API_VERSION
from kubetune.k8s.client import KubeClient
from kubetune.local.processes import read_registry
from tests.cluster.conftest import Release, storage_secret
from tests.cluster.controlplane import ControlPlane
from tests.cluster.test_crds import kubectl
from tests.plugins.kube import condition, wait_for, wait_for_object

FTJ = ("kubetune.io/v1alpha1", "FineTuneJob")


def finetunejob(
    name: str, namespace: str, assets: dict[str, str], *, steps: int, gpus: int = 1
) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": assets["base"]},
            "dataset": {
                "train": assets["train"],
                "format": "chat",
                "validationSplit": 0.1,
                "maxSeqLength": 64,
            },
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "hyperparameters": {
                "maxSteps": steps,
                "learningRate": 0.003,
                "batchSize": 8,
                "scheduler": "constant",
                "warmupRatio": 0.0,
                "precision": "fp32",
                "seed": 1,
            },
            "evaluation": {"everySteps": 10},
            "checkpoint": {"everySteps": 10, "keepLast": 2},
            "output": {"uri": f"s3://{assets['bucket']}/runs/{namespace}/{name}"},
            "storage": {
                "endpoint": assets["endpoint"],
                "region": "us-east-1",
                "credentialsSecret": "s3-keys",
            },
            "resources": {"gpus": gpus, "cpu": "1", "memory": "2Gi"},
            "retry": {"maxRestarts": 2, "backoffSeconds": 1},
        },
    }


async def pods_of(kube: KubeClient, namespace: str, job: str) -> list[dict[str, Any]]:
    return await kube.list("v1", "Pod", namespace, labels={"job-name": job})


def phase(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("phase")


@pytest.fixture()
async def ftj_namespace(cluster_namespace: str, cluster_kube: KubeClient) -> str:
    await cluster_kube.create(storage_secret(cluster_namespace))
    return cluster_namespace


async def test_finetunejob_runs_end_to_end_and_is_garbage_collected(
    control_plane: ControlPlane,
    kubetune_release: Release,
    cluster_kube: KubeClient,
    ftj_namespace: str,
    cluster_assets: dict[str, str],
    cluster_kubeconfig: Path,
) -> None:
    ns, kube = ftj_namespace, cluster_kube
    await kube.create(finetunejob("story", ns, cluster_assets, steps=20))

    # kubectl wait, as a user (or a CI pipeline) would.
    waited = subprocess.run(
        [kubectl(), "wait", "-n", ns, "--for=condition=Succeeded", "ftj/story", "--timeout=300s"],
        capture_output=True,
        text=True,
    )
    ftj = await kube.get(*FTJ, ns, "story")
    assert waited.returncode == 0, (
        f"{waited.stderr}\nstatus: {json.dumps(ftj.get('status'), indent=1)}"
    )
    status = ftj["status"]
    assert status["phase"] == "Succeeded"
    assert status["observedGeneration"] == ftj["metadata"]["generation"] == 1
    assert condition(ftj, "DataValidated")["status"] == "True"
    assert condition(ftj, "Succeeded")["status"] == "True"
    # Progress came from the trainer's own token through the API server (the operator never
    # writes these fields).
    assert status["progress"]["step"] == 20
    assert status["checkpoints"], status
    assert status["artifact"]["uri"].startswith(
        f"s3://{cluster_assets['bucket']}/runs/{ns}/story/model"
    )

    # The scheduler put the CPU-only validation on the CPU node, the training on the GPU node.
    validate_pods = await pods_of(kube, ns, "story-validate")
    train_pods = await pods_of(kube, ns, "story-train")
    assert {p["spec"]["nodeName"] for p in validate_pods} == {"cpu-0"}
    assert {p["spec"]["nodeName"] for p in train_pods} == {"gpu-0"}
    train = train_pods[0]
    assert train["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    # The termination message made it into the pod status, as a kubelet reports it.
    message = json.loads(train["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    assert message["outcome"] == "succeeded"

    events = await kube.list("v1", "Event", ns)
    reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "story"}
    assert {"TrainingSucceeded"} <= reasons, reasons

    # Deleting the FineTuneJob garbage-collects its Jobs, pods, ServiceAccount and Role.
    owned = {
        ("batch/v1", "Job"): ["story-validate", "story-train"],
    }
    for pod in validate_pods + train_pods:
        owned.setdefault(("v1", "Pod"), []).append(pod["metadata"]["name"])
    accounts = [
        sa["metadata"]["name"]
        for sa in await kube.list("v1", "ServiceAccount", ns)
        if any(r.get("kind") == "FineTuneJob" for r in sa["metadata"].get("ownerReferences") or [])
    ]
    roles = [
        r["metadata"]["name"]
        for r in await kube.list("rbac.authorization.k8s.io/v1", "Role", ns)
        if any(o.get("kind") == "FineTuneJob" for o in r["metadata"].get("ownerReferences") or [])
    ]
    assert accounts and roles, (accounts, roles)
    owned[("v1", "ServiceAccount")] = accounts
    owned[("rbac.authorization.k8s.io/v1", "Role")] = roles
    await kube.delete(*FTJ, ns, "story")

    async def all_gone() -> bool:
        for (api_version, kind), names in owned.items():
            for name in names:
                if await kube.get(api_version, kind, ns, name) is not None:
                    return False
        return True

    await wait_for(
        all_gone, timeout=60, interval=0.5, what="garbage collection of the FineTuneJob's children"
    )


async def test_trainer_token_may_patch_only_its_own_finetunejob(
    control_plane: ControlPlane,
    kubetune_release: Release,
    cluster_kube: KubeClient,
    ftj_namespace: str,
    cluster_assets: dict[str, str],
) -> None:
    ns, kube = ftj_namespace, cluster_kube
    mine = finetunejob("mine", ns, cluster_assets, steps=2, gpus=0)
    other = finetunejob("other", ns, cluster_assets, steps=2)
    other["spec"]["suspend"] = True
    await kube.create(mine)
    await kube.create(other)
    account = "mine-trainer"

    async def account_ready() -> bool:
        return await kube.get("v1", "ServiceAccount", ns, account) is not None and bool(
            await kube.list("rbac.authorization.k8s.io/v1", "RoleBinding", ns)
        )

    await wait_for(account_ready, timeout=60, what=f"ServiceAccount {account} and its RoleBinding")
    token = control_plane.token(ns, account)
    trainer = KubeClient(control_plane.server, token=token, ssl_context=_ca_context(control_plane))
    try:
        patch = {"status": {"progress": {"step": 1}}}
        await trainer.patch(*FTJ, ns, "mine", patch, subresource="status")
        with pytest.raises(Exception) as denied:
            await trainer.patch(*FTJ, ns, "other", patch, subresource="status")
        assert getattr(denied.value, "status", None) == 403, denied.value
        with pytest.raises(Exception) as spec_denied:
            await trainer.patch(*FTJ, ns, "mine", {"spec": {"suspend": False}})
        assert getattr(spec_denied.value, "status", None) == 403, spec_denied.value
    finally:
        await trainer.close()


def _ca_context(cp: ControlPlane) -> Any:
    import ssl

    return ssl.create_default_context(cafile=str(cp.pki.ca_path))


def _pod_process_groups(runner_workdir: Path, pod_name: str) -> list[int]:
    entries = read_registry(runner_workdir / "processes.json")
    return [int(e["pid"]) for e in entries if f"/{pod_name}/" in e["name"]]


async def test_killed_trainer_resumes_from_its_checkpoint_and_operator_restart_creates_nothing_twice(
    control_plane: ControlPlane,
    kubetune_release: Release,
    cluster_nodes: Any,
    cluster_kube: KubeClient,
    ftj_namespace: str,
    cluster_assets: dict[str, str],
) -> None:
    ns, kube = ftj_namespace, cluster_kube
    await kube.create(finetunejob("resume", ns, cluster_assets, steps=120))

    # Wait for the first complete checkpoint reported by the trainer.
    await wait_for_object(
        kube, *FTJ, ns, "resume", lambda o: (o.get("status") or {}).get("checkpoints"), timeout=240
    )
    train_job = await kube.get("batch/v1", "Job", ns, "resume-train")
    pods = await pods_of(kube, ns, "resume-train")
    assert len(pods) == 1

    # The active operator replica goes away mid-run; the standby takes over (peering).
    operators = await kube.list(
        "v1", "Pod", kubetune_release.namespace, labels={"app.kubernetes.io/name": "kubetune"}
    )
    assert len(operators) == 2, [p["metadata"]["name"] for p in operators]
    oldest = min(operators, key=lambda p: p["metadata"]["creationTimestamp"])
    await kube.delete("v1", "Pod", kubetune_release.namespace, oldest["metadata"]["name"])

    # SIGKILL the trainer, as the OOM killer or a lost node would.
    groups = _pod_process_groups(cluster_nodes.workdir, pods[0]["metadata"]["name"])
    assert groups, "the trainer's process is not registered by the node runner"
    for pgid in groups:
        os.killpg(pgid, signal.SIGKILL)

    ftj = await wait_for_object(
        kube, *FTJ, ns, "resume", lambda o: phase(o) in ("Succeeded", "Failed"), timeout=400
    )
    status = ftj["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["restarts"] == 1, status
    assert status["resumedFromStep"] > 0, status
    assert status["progress"]["step"] == 120
    # The Job was created again once, for the restart, never twice for the same attempt.
    new_job = await kube.get("batch/v1", "Job", ns, "resume-train")
    assert new_job["metadata"]["uid"] != train_job["metadata"]["uid"]
    events = [
        e for e in await kube.list("v1", "Event", ns) if e["involvedObject"].get("name") == "resume"
    ]
    restarting = [e for e in events if e["reason"] == "Restarting"]
    assert sum(e.get("count", 1) for e in restarting) == 1, [
        (e["reason"], e["message"]) for e in events
    ]
