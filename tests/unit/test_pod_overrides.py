"""spec.podTemplate, imagePullSecrets and serviceAccountName: the merge rules of kubetune.api.pods.

Aspects covered:
- every allowed override lands in every pod kubetune builds (validate Job, train Job single and
  multi-node, serving Deployment), and each built object is valid Kubernetes (strict);
- a maximal override changes nothing kubetune set: command, args, image, the pod and container
  security context, kubetune's env, mounts, labels and annotations stay as built;
- sidecars are native sidecars (initContainers, restartPolicy Always) that start from kubetune's
  container security context and may tighten but not loosen it;
- every refused override is refused three times with its field path: by the CRD (CEL and
  schema, what ``kubectl apply`` and ``kubetune validate`` see), by the spec parse (the
  operator's InvalidSpec), and by the merge itself against the built pod (what a builder sets
  is protected even when a static list forgets it);
- the static lists of reserved names cover everything the builders set, for a matrix of specs;
- a refused override becomes InvalidSpec in the FineTuneJob plan and a terminal model problem
  for a ModelDeployment; revision names do not change for specs without the new fields.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from kubetune.api import pods
from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.api.modeldeployment import ModelDeploymentSpec
from kubetune.api.validation import validate_manifest
from kubetune.finetune import builders as fb
from kubetune.finetune.reconcile import ABSENT_JOB, plan
from kubetune.rollout import builders as rb
from kubetune.rollout import revisions
from kubetune.rollout.revisions import ModelProblem, Revision

K8S_VERSION = "1.30.0"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

FULL_OVERRIDE: dict[str, Any] = {
    "labels": {"team": "nlp", "example.com/cost-center": "42"},
    "annotations": {"example.com/owner": "platform", "sidecar.istio.io/inject": "false"},
    "nodeSelector": {"topology.kubernetes.io/zone": "eu-west-1a"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu-a"]}]}
                ]
            }
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 10,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"team": "nlp"}},
                    },
                }
            ]
        },
    },
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ],
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"team": "nlp"}},
        }
    ],
    "priorityClassName": "ml-batch",
    "volumes": [
        {"name": "certs", "secret": {"secretName": "corp-ca"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}},
    ],
    "volumeMounts": [{"name": "certs", "mountPath": "/etc/corp-ca", "readOnly": True}],
    "env": [
        {"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ],
    "sidecars": [
        {
            "name": "log-shipper",
            "image": "fluent/fluent-bit:3.0",
            "args": ["-c", "/fluent-bit/etc/fluent-bit.conf"],
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
            "volumeMounts": [{"name": "scratch", "mountPath": "/logs"}],
            "securityContext": {"readOnlyRootFilesystem": False},
        }
    ],
}


def make_ftj(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/base"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/demo"},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": "u-1", "generation": 1},
        "spec": base,
    }


def make_md(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"baseModel": {"uri": "s3://models/base"}}}
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "u-2", "generation": 1},
        "spec": base,
    }


REV = Revision(
    name="abc123def0",
    model_uri="s3://models/base",
    adapter_uri=None,
    adapter_digest=None,
    fine_tune_job=None,
    model_name="chat",
    image="ghcr.io/kubetune/server:0.1.0",
)


def ftj_templates(ftj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod template of each FineTuneJob Job, by name."""
    return {
        "validate": fb.build_validate_job(ftj)["spec"]["template"],
        "train": fb.build_train_job(ftj, attempt=0)["spec"]["template"],
    }


def every_template(override: dict[str, Any] | None, **ftj_spec: Any) -> list[tuple[str, dict, str]]:
    """(what, pod template, kubetune's container) for every builder, with ``override``."""
    extra = {"podTemplate": override} if override is not None else {}
    out = []
    for nodes, gpus in ((1, 0), (1, 1), (2, 2)):
        ftj = make_ftj(nodes=nodes, resources={"gpus": gpus}, **extra, **ftj_spec)
        for kind, template in ftj_templates(ftj).items():
            out.append(
                (
                    f"{kind}-nodes{nodes}-gpus{gpus}",
                    template,
                    "trainer" if kind == "train" else "validate",
                )
            )
    md = make_md(**extra)
    out.append(
        (
            "server",
            rb.build_server_deployment(md, REV, role=rb.ROLE_STABLE)["spec"]["template"],
            "server",
        )
    )
    return out


def container(template: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in template["spec"]["containers"] if c["name"] == name)


# --- what may be overridden --------------------------------------------------------------------


def test_every_allowed_override_lands_in_every_pod_and_the_objects_are_valid_kubernetes():
    for what, template, name in every_template(FULL_OVERRIDE):
        meta, pod = template["metadata"], template["spec"]
        main = container(template, name)
        assert (
            meta["labels"]["team"] == "nlp" and meta["labels"]["example.com/cost-center"] == "42"
        ), what
        assert meta["annotations"]["example.com/owner"] == "platform", what
        assert pod["nodeSelector"]["topology.kubernetes.io/zone"] == "eu-west-1a", what
        assert pod["affinity"] == FULL_OVERRIDE["affinity"], what
        assert FULL_OVERRIDE["tolerations"][0] in pod["tolerations"], what
        assert pod["topologySpreadConstraints"] == FULL_OVERRIDE["topologySpreadConstraints"], what
        assert pod["priorityClassName"] == "ml-batch", what
        assert {"certs", "scratch"} <= {v["name"] for v in pod["volumes"]}, what
        assert {"name": "certs", "mountPath": "/etc/corp-ca", "readOnly": True} in main[
            "volumeMounts"
        ], what
        env = {e["name"]: e for e in main["env"]}
        assert env["HTTPS_PROXY"]["value"] == "http://proxy:3128", what
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "wandb",
            "key": "key",
        }, what
        sidecar = pod["initContainers"][0]
        assert sidecar["name"] == "log-shipper" and sidecar["restartPolicy"] == "Always", what
        assert sidecar["args"] == ["-c", "/fluent-bit/etc/fluent-bit.conf"], what
        # kubetune's container stays the first regular container (the local runtime runs it).
        assert pod["containers"][0]["name"] == name and len(pod["containers"]) == 1, what

    ftj = make_ftj(nodes=2, resources={"gpus": 2}, podTemplate=FULL_OVERRIDE)
    for job in (fb.build_validate_job(ftj), fb.build_train_job(ftj, attempt=1)):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    dep = rb.build_server_deployment(make_md(podTemplate=FULL_OVERRIDE), REV, role=rb.ROLE_CANARY)
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_a_maximal_override_changes_nothing_kubetune_set():
    plain = every_template(None)
    merged = every_template(FULL_OVERRIDE)
    for (what, before, name), (_, after, _) in zip(plain, merged, strict=True):
        main_before, main_after = container(before, name), container(after, name)
        for key in (
            "command",
            "args",
            "image",
            "securityContext",
            "resources",
            "ports",
            "startupProbe",
        ):
            assert main_after.get(key) == main_before.get(key), (what, key)

        # kubetune's env, mounts, volumes, labels and annotations come first and unchanged
        # (KUBETUNE_SPEC carries the whole spec, podTemplate included, for the lineage).
        def own(env: list[dict]) -> list[dict]:
            return [e for e in env if e["name"] != "KUBETUNE_SPEC"]

        assert own(main_after["env"])[: len(own(main_before["env"]))] == own(main_before["env"]), (
            what
        )
        assert (
            main_after["volumeMounts"][: len(main_before["volumeMounts"])]
            == main_before["volumeMounts"]
        )
        assert (
            after["spec"]["volumes"][: len(before["spec"]["volumes"])] == before["spec"]["volumes"]
        )
        assert after["spec"]["securityContext"] == before["spec"]["securityContext"], what
        for key in (
            "restartPolicy",
            "serviceAccountName",
            "automountServiceAccountToken",
            "subdomain",
        ):
            assert after["spec"].get(key) == before["spec"].get(key), (what, key)
        for field in ("labels", "annotations"):
            for key, value in (before["metadata"].get(field) or {}).items():
                assert after["metadata"][field][key] == value, (what, field, key)


def test_a_sidecar_starts_from_kubetunes_security_context_and_may_only_tighten_it():
    for what, template, name in every_template(FULL_OVERRIDE):
        base = container(template, name)["securityContext"]
        sidecar = template["spec"]["initContainers"][0]["securityContext"]
        # What the sidecar said wins (a writable root filesystem is not a loosening that a
        # restricted namespace refuses); everything else is kubetune's.
        assert sidecar == {**base, "readOnlyRootFilesystem": False}, what


def test_the_merge_never_modifies_the_built_template():
    template = fb.build_validate_job(make_ftj())["spec"]["template"]
    snapshot = copy.deepcopy(template)
    override = pods.PodTemplate.model_validate(FULL_OVERRIDE)
    pods.merge_pod_template(template, override, container="validate")
    assert template == snapshot


def test_without_a_pod_template_the_pods_are_exactly_as_before():
    ftj = make_ftj()
    template = fb.build_validate_job(ftj)["spec"]["template"]
    assert pods.merge_pod_template(template, None, container="validate") == template
    assert "initContainers" not in template["spec"] and "imagePullSecrets" not in template["spec"]


# --- imagePullSecrets and serviceAccountName -------------------------------------------------------


def test_image_pull_secrets_go_on_every_pod():
    secrets = [{"name": "regcred"}, {"name": "mirror"}]
    ftj = make_ftj(imagePullSecrets=secrets)
    for template in ftj_templates(ftj).values():
        assert template["spec"]["imagePullSecrets"] == secrets
    dep = rb.build_server_deployment(make_md(imagePullSecrets=secrets), REV, role=rb.ROLE_STABLE)
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == secrets


def test_serving_pods_run_as_the_service_account_and_the_trainer_account_copies_its_pull_secrets():
    dep = rb.build_server_deployment(
        make_md(serviceAccountName="llm-serving"), REV, role=rb.ROLE_STABLE
    )
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "llm-serving"
    legacy = rb.build_server_deployment(
        make_md(storage={"serviceAccountName": "s3-reader"}), REV, role=rb.ROLE_STABLE
    )
    assert legacy["spec"]["template"]["spec"]["serviceAccountName"] == "s3-reader"
    # FineTuneJob pods always run as the per-job account (its Role is the progress channel);
    # that account carries the named account's registry secrets.
    ftj = make_ftj(serviceAccountName="ml-team")
    assert FineTuneJobSpec.model_validate(ftj["spec"]).account() == "ml-team"
    for template in ftj_templates(ftj).values():
        assert template["spec"]["serviceAccountName"] == "demo-trainer"
    account = fb.build_trainer_rbac(ftj, image_pull_secrets=[{"name": "team-registry"}])[0]
    assert account["kind"] == "ServiceAccount"
    assert account["imagePullSecrets"] == [{"name": "team-registry"}]
    assert "imagePullSecrets" not in fb.build_trainer_rbac(ftj)[0]


# --- what is refused ---------------------------------------------------------------------------------

# (id, spec fragment, the field path the CRD names, a fragment of the parse error)
FTJ_REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "label-kubetune",
        {"podTemplate": {"labels": {"kubetune.io/owner": "x"}}},
        "spec.podTemplate.labels",
        "labels['kubetune.io/owner']",
    ),
    (
        "label-job-name",
        {"podTemplate": {"labels": {"job-name": "x"}}},
        "spec.podTemplate.labels",
        "labels['job-name']",
    ),
    (
        "label-batch",
        {"podTemplate": {"labels": {"batch.kubernetes.io/job-name": "x"}}},
        "spec.podTemplate.labels",
        "batch.kubernetes.io",
    ),
    (
        "label-managed-by",
        {"podTemplate": {"labels": {"app.kubernetes.io/managed-by": "me"}}},
        "spec.podTemplate.labels",
        "managed-by",
    ),
    (
        "annotation-kubetune",
        {"podTemplate": {"annotations": {"kubetune.io/attempt": "9"}}},
        "spec.podTemplate.annotations",
        "annotations['kubetune.io/attempt']",
    ),
    (
        "annotation-batch",
        {"podTemplate": {"annotations": {"batch.kubernetes.io/job-completion-index": "0"}}},
        "spec.podTemplate.annotations",
        "batch.kubernetes.io",
    ),
    (
        "env-kubetune",
        {"podTemplate": {"env": [{"name": "KUBETUNE_SPEC", "value": "{}"}]}},
        "spec.podTemplate.env[0].name",
        "KUBETUNE_SPEC",
    ),
    (
        "env-hf-home",
        {"podTemplate": {"env": [{"name": "HF_HOME", "value": "/x"}]}},
        "spec.podTemplate.env[0].name",
        "HF_HOME",
    ),
    (
        "env-aws",
        {"podTemplate": {"env": [{"name": "AWS_REGION", "value": "x"}]}},
        "spec.podTemplate.env[0].name",
        "AWS_REGION",
    ),
    (
        "env-rendezvous",
        {"podTemplate": {"env": [{"name": "MASTER_ADDR", "value": "x"}]}},
        "spec.podTemplate.env[0].name",
        "MASTER_ADDR",
    ),
    (
        "env-value-and-from",
        {
            "podTemplate": {
                "env": [
                    {
                        "name": "A",
                        "value": "x",
                        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                    }
                ]
            }
        },
        "spec.podTemplate.env[0]",
        "not both",
    ),
    (
        "env-two-sources",
        {
            "podTemplate": {
                "env": [
                    {
                        "name": "A",
                        "valueFrom": {
                            "fieldRef": {"fieldPath": "a"},
                            "secretKeyRef": {"name": "s", "key": "k"},
                        },
                    }
                ]
            }
        },
        "spec.podTemplate.env[0].valueFrom",
        "exactly one",
    ),
    (
        "volume-tmp",
        {"podTemplate": {"volumes": [{"name": "tmp", "emptyDir": {}}]}},
        "spec.podTemplate.volumes[0].name",
        "'tmp'",
    ),
    (
        "volume-token",
        {"podTemplate": {"volumes": [{"name": "kube-api-access-x", "emptyDir": {}}]}},
        "spec.podTemplate.volumes[0].name",
        "kube-api-access-",
    ),
    (
        "volume-no-source",
        {"podTemplate": {"volumes": [{"name": "a"}]}},
        "spec.podTemplate.volumes[0]",
        "exactly one volume source",
    ),
    (
        "volume-two-sources",
        {
            "podTemplate": {
                "volumes": [{"name": "a", "emptyDir": {}, "secret": {"secretName": "s"}}]
            }
        },
        "spec.podTemplate.volumes[0]",
        "exactly one volume source",
    ),
    (
        "mount-tmp",
        {
            "podTemplate": {
                "volumes": [{"name": "a", "emptyDir": {}}],
                "volumeMounts": [{"name": "a", "mountPath": "/tmp"}],
            }
        },
        "spec.podTemplate.volumeMounts",
        "volumeMounts[0].mountPath",
    ),
    (
        "mount-token",
        {
            "podTemplate": {
                "volumes": [{"name": "a", "emptyDir": {}}],
                "volumeMounts": [{"name": "a", "mountPath": pods.SERVICE_ACCOUNT_MOUNT}],
            }
        },
        "spec.podTemplate.volumeMounts",
        "volumeMounts[0].mountPath",
    ),
    (
        "mount-no-volume",
        {"podTemplate": {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}},
        "spec.podTemplate",
        "no volume 'nope'",
    ),
    (
        "sidecar-mount-no-volume",
        {
            "podTemplate": {
                "sidecars": [
                    {
                        "name": "s",
                        "image": "i",
                        "volumeMounts": [{"name": "nope", "mountPath": "/x"}],
                    }
                ]
            }
        },
        "spec.podTemplate",
        "sidecars[0].volumeMounts[0].name",
    ),
    (
        "sidecar-name",
        {"podTemplate": {"sidecars": [{"name": "trainer", "image": "i"}]}},
        "spec.podTemplate.sidecars[0].name",
        "'trainer'",
    ),
    (
        "sidecar-restart-policy",
        {"podTemplate": {"sidecars": [{"name": "s", "image": "i", "restartPolicy": "Never"}]}},
        "spec.podTemplate.sidecars[0].restartPolicy",
        "restartPolicy",
    ),
    (
        "sidecar-privileged",
        {
            "podTemplate": {
                "sidecars": [{"name": "s", "image": "i", "securityContext": {"privileged": True}}]
            }
        },
        "spec.podTemplate.sidecars[0].securityContext.privileged",
        "privileged",
    ),
    (
        "sidecar-root",
        {
            "podTemplate": {
                "sidecars": [{"name": "s", "image": "i", "securityContext": {"runAsUser": 0}}]
            }
        },
        "spec.podTemplate.sidecars[0].securityContext.runAsUser",
        "UID 0",
    ),
    (
        "sidecar-non-root-false",
        {
            "podTemplate": {
                "sidecars": [
                    {"name": "s", "image": "i", "securityContext": {"runAsNonRoot": False}}
                ]
            }
        },
        "spec.podTemplate.sidecars[0].securityContext.runAsNonRoot",
        "non-root",
    ),
    (
        "sidecar-escalation",
        {
            "podTemplate": {
                "sidecars": [
                    {
                        "name": "s",
                        "image": "i",
                        "securityContext": {"allowPrivilegeEscalation": True},
                    }
                ]
            }
        },
        "spec.podTemplate.sidecars[0].securityContext.allowPrivilegeEscalation",
        "escalation",
    ),
    (
        "sidecar-capabilities",
        {
            "podTemplate": {
                "sidecars": [
                    {
                        "name": "s",
                        "image": "i",
                        "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
                    }
                ]
            }
        },
        "spec.podTemplate.sidecars[0].securityContext.capabilities.add",
        "add capabilities",
    ),
    (
        "node-selector-conflict",
        {
            "resources": {"gpuNodeSelector": {"pool": "a100"}},
            "podTemplate": {"nodeSelector": {"pool": "h100"}},
        },
        "spec.podTemplate.nodeSelector",
        "nodeSelector['pool']",
    ),
    (
        "priority-conflict",
        {"resources": {"priorityClassName": "high"}, "podTemplate": {"priorityClassName": "low"}},
        "spec.podTemplate.priorityClassName",
        "priorityClassName",
    ),
    (
        "service-account-conflict",
        {"serviceAccountName": "a", "storage": {"serviceAccountName": "b"}},
        "spec.serviceAccountName",
        "serviceAccountName",
    ),
    (
        "security-context",
        {"podTemplate": {"securityContext": {"runAsUser": 0}}},
        "spec.podTemplate.securityContext",
        "securityContext",
    ),
    ("command", {"podTemplate": {"command": ["sh"]}}, "spec.podTemplate.command", "command"),
]


@pytest.mark.parametrize(
    ("case", "fragment", "path", "message"), FTJ_REFUSED, ids=[c[0] for c in FTJ_REFUSED]
)
def test_a_refused_finetunejob_override_is_an_error_naming_its_field(
    case: str, fragment: dict[str, Any], path: str, message: str
) -> None:
    ftj = make_ftj(**fragment)
    # 1. At admission: the CRD's schema and CEL rules (kubectl apply, kubetune validate).
    errors = validate_manifest(ftj)
    assert any(e.path == path for e in errors), [str(e) for e in errors]
    # 2. The operator's own parse of the spec (servers without the CRD's rules, the local runtime).
    with pytest.raises(ValidationError) as info:
        FineTuneJobSpec.model_validate(ftj["spec"])
    assert message in str(info.value)
    # 3. ...which the plan reports as InvalidSpec, creating nothing.
    result = plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW)
    assert result.status["phase"] == "Failed" and "invalid spec" in result.status["message"]
    assert not [a for a in result.actions if type(a).__name__ == "CreateJob"]


MD_REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "annotation-scrape",
        {"podTemplate": {"annotations": {"prometheus.io/port": "9"}}},
        "spec.podTemplate.annotations",
        "prometheus.io/",
    ),
    (
        "env-server-env",
        {
            "server": {"env": [{"name": "FOO", "value": "1"}]},
            "podTemplate": {"env": [{"name": "FOO", "value": "2"}]},
        },
        "spec.podTemplate.env",
        "server.env also sets FOO",
    ),
    (
        "env-kubetune",
        {"podTemplate": {"env": [{"name": "KUBETUNE_PORT", "value": "1"}]}},
        "spec.podTemplate.env[0].name",
        "KUBETUNE_PORT",
    ),
    (
        "sidecar-name",
        {"podTemplate": {"sidecars": [{"name": "server", "image": "i"}]}},
        "spec.podTemplate.sidecars[0].name",
        "'server'",
    ),
    (
        "node-selector-conflict",
        {
            "resources": {"nodeSelector": {"pool": "a"}},
            "podTemplate": {"nodeSelector": {"pool": "b"}},
        },
        "spec.podTemplate.nodeSelector",
        "nodeSelector['pool']",
    ),
    (
        "service-account-conflict",
        {"serviceAccountName": "a", "storage": {"serviceAccountName": "b"}},
        "spec.serviceAccountName",
        "serviceAccountName",
    ),
]


@pytest.mark.parametrize(
    ("case", "fragment", "path", "message"), MD_REFUSED, ids=[c[0] for c in MD_REFUSED]
)
def test_a_refused_modeldeployment_override_is_an_error_naming_its_field(
    case: str, fragment: dict[str, Any], path: str, message: str
) -> None:
    md = make_md(**fragment)
    errors = validate_manifest(md)
    assert any(e.path == path for e in errors), [str(e) for e in errors]
    with pytest.raises(ValidationError) as info:
        ModelDeploymentSpec.model_validate(md["spec"])
    assert message in str(info.value)


def test_allowed_overrides_pass_the_crd_and_the_parse():
    assert (
        validate_manifest(make_ftj(podTemplate=FULL_OVERRIDE, imagePullSecrets=[{"name": "r"}]))
        == []
    )
    assert validate_manifest(make_md(podTemplate=FULL_OVERRIDE, serviceAccountName="sa")) == []
    # Same value in resources and podTemplate is no conflict.
    same = make_ftj(
        resources={"gpuNodeSelector": {"pool": "a"}, "priorityClassName": "p"},
        podTemplate={"nodeSelector": {"pool": "a"}, "priorityClassName": "p"},
    )
    assert validate_manifest(same) == []
    FineTuneJobSpec.model_validate(same["spec"])


# --- the merge's own refusals, against whatever the builder set --------------------------------------


def _unchecked(**fields: Any) -> pods.PodTemplate:
    """An override built without the static checks: what only the merge itself can catch."""
    base = pods.PodTemplate()
    return base.model_copy(update={k: v for k, v in fields.items()})


def _template() -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "x"}, "annotations": {"note": "kubetune"}},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "env": [{"name": "FOO", "value": "1"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    "securityContext": {"runAsNonRoot": True},
                }
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "nodeSelector": {"pool": "a"},
            "priorityClassName": "high",
            "affinity": {"nodeAffinity": {"x": 1}},
        },
    }


MERGE_REFUSED = [
    ("built-label", {"labels": {"app": "y"}}, "labels['app']"),
    ("built-annotation", {"annotations": {"note": "y"}}, "annotations['note']"),
    (
        "built-env",
        {"env": [pods.EnvVar.model_construct(name="FOO", value="2", value_from=None)]},
        "env[0].name",
    ),
    (
        "built-volume",
        {"volumes": [pods.Volume.model_construct(name="data", empty_dir={})]},
        "volumes[0].name",
    ),
    (
        "built-mount-path",
        {"volume_mounts": [pods.VolumeMount(name="data", mountPath="/data")]},
        "volumeMounts[0].mountPath",
    ),
    (
        "built-container",
        {
            "sidecars": [
                pods.Sidecar.model_construct(
                    name="main", image="i", security_context=None, volume_mounts=[]
                )
            ]
        },
        "sidecars[0].name",
    ),
    ("built-node-selector", {"node_selector": {"pool": "b"}}, "nodeSelector['pool']"),
    ("built-priority", {"priority_class_name": "low"}, "priorityClassName"),
    ("built-affinity", {"affinity": pods.Affinity(nodeAffinity={"y": 2})}, "affinity.nodeAffinity"),
]


@pytest.mark.parametrize(
    ("case", "fields", "where"), MERGE_REFUSED, ids=[c[0] for c in MERGE_REFUSED]
)
def test_the_merge_refuses_to_change_what_the_builder_set(
    case: str, fields: dict[str, Any], where: str
) -> None:
    with pytest.raises(pods.PodTemplateError) as info:
        pods.merge_pod_template(_template(), _unchecked(**fields), container="main")
    assert f"spec.podTemplate.{where}" in str(info.value)


def test_a_merge_refusal_is_invalid_spec_in_both_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    # A builder that starts setting a variable the static list does not know yet: the merge
    # still protects it, and the operator reports it instead of failing to create the Job.
    monkeypatch.setattr(pods, "RESERVED_ENV", ())
    monkeypatch.setattr(pods, "reserved_env", lambda name: name.startswith("KUBETUNE_"))
    ftj = make_ftj(podTemplate={"env": [{"name": "HF_HOME", "value": "/elsewhere"}]})
    result = plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW)
    assert result.status["phase"] == "Failed"
    assert "spec.podTemplate.env[0].name: kubetune sets HF_HOME" in result.status["message"]
    md = make_md(podTemplate={"env": [{"name": "HF_HOME", "value": "/elsewhere"}]})
    problem = rb.check_pod_template(md, REV)
    assert isinstance(problem, ModelProblem) and problem.terminal
    assert problem.reason == "InvalidSpec" and "HF_HOME" in problem.message
    assert rb.check_pod_template(make_md(), REV) is REV


# --- the static lists cover what the builders set ----------------------------------------------------

FTJ_MATRIX = [
    {"nodes": 1, "resources": {"gpus": 0}},
    {"nodes": 1, "resources": {"gpus": 1, "priorityClassName": "p"}},
    {"nodes": 1, "resources": {"gpus": 4}},
    {"nodes": 3, "resources": {"gpus": 2}, "queueName": "q"},
    {"storage": {"endpoint": "http://minio:9000", "region": "eu", "credentialsSecret": "s3"}},
]


@pytest.mark.parametrize("spec", FTJ_MATRIX)
def test_the_reserved_lists_cover_everything_the_finetunejob_builders_set(
    spec: dict[str, Any],
) -> None:
    ftj = make_ftj(**spec)
    for report in ("k8s", "file:///tmp/r.json"):
        for template, name in (
            (fb.build_validate_job(ftj, report=report)["spec"]["template"], "validate"),
            (fb.build_train_job(ftj, attempt=2, report=report)["spec"]["template"], "trainer"),
        ):
            _assert_covered(template, name)


def test_the_reserved_lists_cover_everything_the_server_builder_sets() -> None:
    md = make_md(
        resources={"gpus": 2, "nodeSelector": {"a": "b"}},
        storage={"endpoint": "http://minio:9000", "region": "eu", "credentialsSecret": "s3"},
    )
    rev = Revision(**{**REV.__dict__, "adapter_uri": "s3://a", "adapter_digest": "d"})
    template = rb.build_server_deployment(md, rev, role=rb.ROLE_CANARY)["spec"]["template"]
    annotations = template["metadata"].pop("annotations")
    assert all(k.startswith("prometheus.io/") for k in annotations)
    _assert_covered(template, "server")


def _assert_covered(template: dict[str, Any], name: str) -> None:
    pod = template["spec"]
    assert name in pods.RESERVED_CONTAINERS
    assert all(pods.reserved_label(k) for k in template["metadata"].get("labels") or {})
    assert all(
        k.startswith(pods.RESERVED_ANNOTATION_PREFIXES)
        for k in template["metadata"].get("annotations") or {}
    )
    assert {v["name"] for v in pod["volumes"]} <= set(pods.RESERVED_VOLUMES)
    for c in pod["containers"]:
        assert c["name"] in pods.RESERVED_CONTAINERS
        assert {m["mountPath"] for m in c.get("volumeMounts") or []} <= set(
            pods.RESERVED_MOUNT_PATHS
        )
        assert all(pods.reserved_env(e["name"]) for e in c.get("env") or []), [
            e["name"] for e in c["env"]
        ]


# --- revisions ---------------------------------------------------------------------------------------


def test_revision_names_change_with_pod_settings_and_only_then():
    spec = ModelDeploymentSpec.model_validate(make_md()["spec"])
    resolved = {
        "modelUri": "s3://models/base",
        "adapterUri": None,
        "adapterDigest": None,
        "modelName": "chat",
        "modelRevision": None,
    }
    plain = revisions.revision_hash(spec, resolved)
    # The name this spec had before the new fields existed (computed on the earlier main):
    # upgrading the operator starts no canary.
    assert plain == "49accb119e"
    # An object stored with the old CRD default written in hashes the same as one without it.
    stored = ModelDeploymentSpec.model_validate(
        make_md(server={"image": "ghcr.io/kubetune/server:0.1.0"})["spec"]
    )
    assert revisions.revision_hash(stored, resolved) == plain
    seen = {plain}
    for extra in (
        {"podTemplate": {"labels": {"team": "nlp"}}},
        {"imagePullSecrets": [{"name": "regcred"}]},
        {"serviceAccountName": "serving"},
    ):
        other = ModelDeploymentSpec.model_validate(make_md(**extra)["spec"])
        seen.add(revisions.revision_hash(other, resolved))
    assert len(seen) == 4
    # The account moved from storage.serviceAccountName to serviceAccountName: same revision.
    legacy = ModelDeploymentSpec.model_validate(make_md(storage={"serviceAccountName": "sa"})["spec"])
    moved = ModelDeploymentSpec.model_validate(make_md(serviceAccountName="sa")["spec"])
    assert revisions.revision_hash(legacy, resolved) == revisions.revision_hash(moved, resolved)


# --- cluster defaults (KUBETUNE_POD_DEFAULTS) -------------------------------------------------------


def test_cluster_defaults_parse_and_a_bad_value_names_the_field():
    from kubetune.api.defaults import DefaultsError, PodDefaults, load_defaults

    assert load_defaults({}) == PodDefaults()
    # The chart renders "" for an image left to its own version.
    assert load_defaults({"KUBETUNE_POD_DEFAULTS": '{"trainerImage": ""}'}) == PodDefaults()
    with pytest.raises(DefaultsError, match="KUBETUNE_POD_DEFAULTS is not valid JSON"):
        load_defaults({"KUBETUNE_POD_DEFAULTS": "{"})
    with pytest.raises(DefaultsError, match=r"gpuNodeSelector\.pool"):
        load_defaults({"KUBETUNE_POD_DEFAULTS": '{"gpuNodeSelector": {"pool": "not a label"}}'})
    with pytest.raises(DefaultsError, match="imagePullSecret"):
        load_defaults({"KUBETUNE_POD_DEFAULTS": '{"imagePullSecret": []}'})


def test_objects_stored_with_the_old_crd_default_image_keep_it_and_the_lineage_records_the_image():
    from kubetune.api.defaults import PodDefaults

    cluster = PodDefaults(trainerImage="registry.example.com/trainer:2")
    stored = make_ftj(image="ghcr.io/kubetune/trainer:0.1.0")  # defaulted by the old CRD
    for ftj, expected in (
        (stored, "ghcr.io/kubetune/trainer:0.1.0"),
        (make_ftj(), "registry.example.com/trainer:2"),
    ):
        job = fb.build_train_job(ftj, attempt=0, defaults=cluster)
        main = job["spec"]["template"]["spec"]["containers"][0]
        assert main["image"] == expected
        # The trainer writes the image into lineage.json from KUBETUNE_IMAGE.
        assert {"name": "KUBETUNE_IMAGE", "value": expected} in main["env"]
    # Without any defaults (the local runtime, kubetune validate) the built-in image applies.
    assert fb.build_validate_job(make_ftj())["spec"]["template"]["spec"]["containers"][0][
        "image"
    ] == ("ghcr.io/kubetune/trainer:0.1.0")


def test_a_sidecar_can_be_started_by_name_from_the_built_manifest(tmp_path):
    # Found by the cluster tier: the node runner (which plays the kubelet with the local
    # runtime's container resolution) could not find a sidecar, an initContainer, by name.
    from kubetune.local.containers import main_container, to_process

    override = {
        **FULL_OVERRIDE,
        "sidecars": [{**FULL_OVERRIDE["sidecars"][0], "command": ["python", "-c", "pass"]}],
    }
    job = fb.build_validate_job(make_ftj(podTemplate=override))
    assert main_container(job)["name"] == "validate"
    process = to_process(
        job, "p", tmp_path, tmp_path / "c", lambda name, key: "x", container_name="log-shipper"
    )
    assert process.argv[1:] == ["-c", "pass", "-c", "/fluent-bit/etc/fluent-bit.conf"]
