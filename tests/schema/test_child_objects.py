"""Every child object the builders make from the shipped examples is valid Kubernetes and "restricted".

For each FineTuneJob in ``examples/`` (validate Job, train Job for a first and a later attempt,
headless Service, trainer ServiceAccount/Role/RoleBinding) and each ModelDeployment (stable
and canary Deployments, revision and stable Services, PDB, HTTPRoute), with the spec defaulted
as the API server stores it:

- kubernetes-validate accepts the object (strict: a misspelt field is an error); HTTPRoute,
  which it has no schema for, is checked by shape;
- every pod template meets the Pod Security Standard "restricted" (docs/security.md): non-root,
  no privilege escalation, all capabilities dropped, RuntimeDefault seccomp, read-only root
  filesystem, no host namespaces or hostPath;
- S3 credentials reach containers only through secretKeyRef, never as literal values;
- the trainer Role grants only get/patch on its own FineTuneJob's status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.api.modeldeployment import ModelDeploymentSpec
from kubetune.api.validation import _schemas, apply_defaults
from kubetune.finetune import builders as ftb
from kubetune.rollout import builders as mdb
from kubetune.rollout.revisions import Revision, resolve

REPO = Path(__file__).resolve().parents[2]
KUBE_VERSION = "1.30"


def _examples(kind: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == kind:
                doc = apply_defaults(doc, _schemas()[kind])
                doc["metadata"].setdefault("namespace", "team-a")
                doc["metadata"].setdefault("uid", "00000000-0000-0000-0000-000000000001")
                out.append(doc)
    return out


FTJS = _examples("FineTuneJob")
MDEPS = _examples("ModelDeployment")
SUCCEEDED_FTJ = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot-lora", "namespace": "team-a"},
    "spec": FTJS[0]["spec"] if FTJS else {},
    "status": {
        "phase": "Succeeded",
        "artifact": {"uri": "s3://artifacts/support-bot/lora-v1/model/", "digest": "sha256:ab"},
    },
}


def ftj_children(ftj: dict[str, Any]) -> list[dict[str, Any]]:
    objs = [
        ftb.build_validate_job(ftj),
        ftb.build_train_job(ftj, attempt=0),
        ftb.build_train_job(ftj, attempt=2),
    ]
    objs += ftb.build_trainer_rbac(
        ftj, service_account_annotations={"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}
    )
    if ftj["spec"].get("nodes", 1) > 1:
        objs.append(ftb.build_train_service(ftj))
    return objs


def mdep_children(md: dict[str, Any]) -> list[dict[str, Any]]:
    revision = resolve(
        ModelDeploymentSpec.model_validate(md["spec"]), md["metadata"]["name"], SUCCEEDED_FTJ
    )
    assert isinstance(revision, Revision), revision
    objs = [
        mdb.build_server_deployment(md, revision, role=mdb.ROLE_STABLE),
        mdb.build_server_deployment(md, revision, role=mdb.ROLE_CANARY, replicas=1),
        mdb.build_revision_service(md, revision.name),
        mdb.build_stable_service(md),
        mdb.build_pdb(md, revision.name),
    ]
    if md["spec"]["traffic"]["mode"] == "gatewayAPI":
        objs.append(mdb.build_httproute(md, {revision.name: 90, "0123456789": 10}))
    return objs


CHILDREN = [
    (f"{o['metadata']['name']}/{c['kind']}/{c['metadata']['name']}", c)
    for o in FTJS
    for c in ftj_children(o)
]
CHILDREN += [
    (f"{o['metadata']['name']}/{c['kind']}/{c['metadata']['name']}", c)
    for o in MDEPS
    for c in mdep_children(o)
]


def test_examples_cover_both_kinds() -> None:
    assert len(FTJS) >= 3 and len(MDEPS) >= 2
    assert {c["kind"] for _, c in CHILDREN} >= {
        "Job",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HTTPRoute",
        "Role",
    }


@pytest.mark.parametrize(("name", "obj"), CHILDREN, ids=[n for n, _ in CHILDREN])
def test_child_object_is_valid_kubernetes(name: str, obj: dict[str, Any]) -> None:
    if obj["kind"] == "HTTPRoute":
        assert obj["apiVersion"] == "gateway.networking.k8s.io/v1"
        rule = obj["spec"]["rules"][0]
        assert sum(b["weight"] for b in rule["backendRefs"]) == 100
        assert obj["spec"]["parentRefs"][0]["name"]
        return
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    template = obj.get("spec", {}).get("template")
    return [template["spec"]] if template else []


POD_OWNERS = [(n, c) for n, c in CHILDREN if _pod_specs(c)]


@pytest.mark.parametrize(("name", "obj"), POD_OWNERS, ids=[n for n, _ in POD_OWNERS])
def test_pods_meet_the_restricted_pod_security_standard(name: str, obj: dict[str, Any]) -> None:
    for pod in _pod_specs(obj):
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert not any("hostPath" in v for v in pod.get("volumes", []))
        pod_sc = pod.get("securityContext", {})
        for container in pod.get("initContainers", []) + pod["containers"]:
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, container["name"]
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
            assert not sc.get("capabilities", {}).get("add"), container["name"]
            assert not sc.get("privileged"), container["name"]
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, container["name"]
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", container["name"]
            assert sc.get("readOnlyRootFilesystem") is True, container["name"]
            for env in container.get("env", []):
                if env["name"] in (
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN",
                ):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_trainer_role_is_limited_to_its_own_status() -> None:
    for ftj in FTJS:
        (role,) = [o for o in ftj_children(ftj) if o["kind"] == "Role"]
        assert role["rules"] == [
            {
                "apiGroups": ["kubetune.io"],
                "resources": ["finetunejobs/status"],
                "resourceNames": [ftj["metadata"]["name"]],
                "verbs": ["get", "patch"],
            }
        ]
