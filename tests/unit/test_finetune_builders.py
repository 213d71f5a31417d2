"""FineTuneJob child builders: names, labels, owner references, trainer env, pod security,
GPU placement, Kueue, multi-node Indexed Jobs with torchrun rendezvous, RBAC scoping; every
built object is validated against the Kubernetes OpenAPI schema (kubernetes-validate, strict).
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from kubetune.api.common import LABEL_COMPONENT, LABEL_KIND, LABEL_OWNER
from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.finetune import builders

K8S_VERSION = "1.30.0"


def make_ftj(
    name: str = "demo", namespace: str = "team-a", uid: str | None = "uid-1", **spec: Any
) -> dict:
    """A FineTuneJob wire object with the minimum spec, plus overrides (camelCase)."""
    base: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/base"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/demo"},
    }
    base.update(spec)
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "generation": 1}
    if uid:
        meta["uid"] = uid
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": meta,
        "spec": base,
    }


def env_of(job: dict) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def k8s_valid(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# --- validate Job -------------------------------------------------------------------------


def test_validate_job_runs_the_validator_on_cpu_with_the_contract_env():
    ftj = make_ftj()
    job = builders.build_validate_job(ftj)
    k8s_valid(job)
    assert job["metadata"]["name"] == "demo-validate"
    assert job["metadata"]["namespace"] == "team-a"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "kubetune_trainer", "validate"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert pod["restartPolicy"] == "Never"
    env = env_of(job)
    assert json.loads(env["KUBETUNE_SPEC"]) == FineTuneJobSpec.model_validate(ftj["spec"]).dump()
    assert env["KUBETUNE_JOB_NAME"] == "demo" and env["KUBETUNE_NAMESPACE"] == "team-a"
    assert env["KUBETUNE_JOB_UID"] == "uid-1" and env["KUBETUNE_ATTEMPT"] == "0"
    assert env["KUBETUNE_REPORT"] == "k8s"
    assert env["KUBETUNE_TERMINATION_LOG"] == "/dev/termination-log"
    assert container["terminationMessagePath"] == "/dev/termination-log"


def test_validate_job_fails_at_once_on_exit_2():
    rules = builders.build_validate_job(make_ftj())["spec"]["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "validate", "operator": "In", "values": [2]},
    } in rules


@pytest.mark.parametrize(
    "build", [builders.build_validate_job, lambda f: builders.build_train_job(f, attempt=0)]
)
def test_children_are_owned_labelled_and_locked_down(build):
    job = build(make_ftj())
    ref = job["metadata"]["ownerReferences"][0]
    assert ref == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "demo",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels[LABEL_OWNER] == "demo" and labels[LABEL_KIND] == "FineTuneJob"
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sec = pod["containers"][0]["securityContext"]
    assert sec["allowPrivilegeEscalation"] is False and sec["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/cache"} <= mounts
    assert pod["serviceAccountName"] == "demo-trainer"


def test_local_runtime_objects_without_uid_get_no_owner_reference_and_no_service_account():
    ftj = make_ftj(uid=None)
    job = builders.build_train_job(ftj, attempt=0, report="file:///tmp/x/status.json")
    assert "ownerReferences" not in job["metadata"]
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]
    assert env_of(job)["KUBETUNE_REPORT"] == "file:///tmp/x/status.json"


def test_image_argument_overrides_the_spec_image():
    job = builders.build_validate_job(
        make_ftj(image="registry/trainer:1"), image="local/trainer:dev"
    )
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "local/trainer:dev"
    job = builders.build_validate_job(make_ftj(image="registry/trainer:1"))
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry/trainer:1"


# --- train Job ----------------------------------------------------------------------------


def test_train_job_requests_gpus_with_placement_and_priority():
    ftj = make_ftj(
        resources={
            "gpus": 2,
            "cpu": "8",
            "memory": "64Gi",
            "gpuNodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
            ],
            "priorityClassName": "training-low",
        }
    )
    job = builders.build_train_job(ftj, attempt=3)
    k8s_valid(job)
    pod = job["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2" and res["requests"]["nvidia.com/gpu"] == "2"
    assert res["requests"]["cpu"] == "8" and res["limits"]["memory"] == "64Gi"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    keys = [t["key"] for t in pod["tolerations"]]
    assert keys == ["dedicated", "nvidia.com/gpu"]
    assert pod["priorityClassName"] == "training-low"
    assert job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["annotations"][builders.ANNOTATION_ATTEMPT] == "3"
    assert env_of(job)["KUBETUNE_ATTEMPT"] == "3"
    # 2 GPUs on one node: torchrun standalone with one process per GPU.
    assert pod["containers"][0]["command"][:3] == ["torchrun", "--standalone", "--nproc-per-node=2"]
    assert {"/dev/shm"} <= {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}


def test_cpu_training_has_no_gpu_resources_and_runs_python():
    job = builders.build_train_job(
        make_ftj(resources={"gpus": 0, "cpu": "2", "memory": "4Gi"}), attempt=0
    )
    k8s_valid(job)
    pod = job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(pod)
    assert pod["containers"][0]["command"] == ["python", "-m", "kubetune_trainer", "train"]


def test_queue_name_adds_the_kueue_label_and_creates_the_job_suspended():
    job = builders.build_train_job(make_ftj(queueName="gpu-queue"), attempt=0)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    plain = builders.build_train_job(make_ftj(), attempt=0)
    assert (
        "suspend" not in plain["spec"]
        and "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]
    )


def test_multi_node_is_an_indexed_job_with_headless_service_and_torchrun_env():
    ftj = make_ftj(nodes=4, resources={"gpus": 8})
    job = builders.build_train_job(ftj, attempt=0)
    k8s_valid(job)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "demo-train"
    env = env_of(job)
    assert env["MASTER_ADDR"] == "demo-train-0.demo-train.team-a.svc"
    assert env["MASTER_PORT"] == "29500" and env["NNODES"] == "4" and env["NPROC_PER_NODE"] == "8"
    assert (
        env["NODE_RANK"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert pod["containers"][0]["command"][0] == "torchrun"
    svc = builders.build_train_service(ftj)
    k8s_valid(svc)
    assert svc["metadata"]["name"] == "demo-train" and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {LABEL_OWNER: "demo", LABEL_COMPONENT: "train"}
    assert set(svc["spec"]["selector"].items()) <= set(pod_labels(job).items())


def pod_labels(job: dict) -> dict:
    return job["spec"]["template"]["metadata"]["labels"]


def test_s3_credentials_come_only_from_the_named_secret():
    ftj = make_ftj(
        storage={
            "endpoint": "http://minio:9000",
            "region": "eu-west-1",
            "credentialsSecret": "s3-creds",
        }
    )
    job = builders.build_train_job(ftj, attempt=0)
    k8s_valid(job)
    env = env_of(job)
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_REGION"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    no_secret = env_of(builders.build_train_job(make_ftj(), attempt=0))
    assert "AWS_ACCESS_KEY_ID" not in no_secret and "AWS_ENDPOINT_URL" not in no_secret


def test_builders_are_deterministic():
    ftj = make_ftj(nodes=2, resources={"gpus": 1}, queueName="q")
    assert builders.build_train_job(ftj, attempt=1) == builders.build_train_job(ftj, attempt=1)
    assert builders.build_validate_job(ftj) == builders.build_validate_job(ftj)


def test_malformed_spec_raises_naming_the_field():
    ftj = make_ftj(nodes=0)
    with pytest.raises(Exception, match="nodes"):
        builders.build_train_job(ftj, attempt=0)


# --- RBAC ---------------------------------------------------------------------------------


def test_trainer_role_may_only_patch_its_own_status():
    objs = builders.build_trainer_rbac(
        make_ftj(), service_account_annotations={"eks.amazonaws.com/role-arn": "arn:x"}
    )
    for obj in objs:
        k8s_valid(obj)
    sa, role, binding = objs
    assert [o["kind"] for o in objs] == ["ServiceAccount", "Role", "RoleBinding"]
    assert {o["metadata"]["name"] for o in objs} == {"demo-trainer"}
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:x"}
    assert role["rules"] == [
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["demo"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "demo-trainer", "namespace": "team-a"}
    ]
    assert binding["roleRef"]["name"] == "demo-trainer"


def test_multi_node_full_finetuning_hands_the_strategy_to_every_torchrun_worker():
    ftj = make_ftj(
        nodes=2, resources={"gpus": 8}, method={"type": "full"}, distributed={"strategy": "fsdp"}
    )
    job = builders.build_train_job(ftj, attempt=0)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--nnodes=$(NNODES)", "--nproc-per-node=$(NPROC_PER_NODE)"]
    env = env_of(job)
    assert env["NNODES"] == "2" and env["NPROC_PER_NODE"] == "8"
    # The trainer reads the strategy from the spec it is given (docs/contracts.md).
    assert json.loads(env["KUBETUNE_SPEC"])["distributed"] == {"strategy": "fsdp"}
