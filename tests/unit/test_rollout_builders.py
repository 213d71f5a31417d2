"""ModelDeployment child builders (``kubetune.rollout.builders``).

Aspects covered: names and labels of docs/contracts.md; the server environment (model, adapter,
digest, server config, storage keys only from the Secret, user env last); probes, resources
with GPUs, pod security; the role label kept out of the pod template (promotion restarts
nothing); ownerReferences only when the parent has a uid; Services selecting one revision vs
every revision; the PDB; the HTTPRoute's weighted backendRefs and parentRefs; every built
object valid for Kubernetes (kubernetes-validate, when the schema is available).
"""

from __future__ import annotations

import pytest

from kubetune.api.common import LABEL_ENGINE, LABEL_OWNER, LABEL_REVISION
from kubetune.rollout import builders as b
from kubetune.rollout.revisions import Revision

MD = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"},
    "spec": {
        "model": {"baseModel": {"uri": "s3://models/base"}, "adapter": {"uri": "s3://models/ad"}},
        "replicas": 3,
        "resources": {
            "gpus": 1,
            "cpu": "4",
            "memory": "24Gi",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
        "storage": {
            "endpoint": "http://minio:9000",
            "region": "us-east-1",
            "credentialsSecret": "s3-creds",
        },
        "server": {"port": 8080, "env": [{"name": "KUBETUNE_FAULT_ERROR_RATE", "value": "0.2"}]},
        "traffic": {
            "mode": "gatewayAPI",
            "parentRefs": [{"name": "gw", "namespace": "infra", "sectionName": "https"}],
            "hostnames": ["chat.example.com"],
            "port": 80,
        },
    },
}
REV = Revision(
    name="abc123def0",
    model_uri="s3://models/base",
    adapter_uri="s3://models/ad",
    adapter_digest="sha256:ff",
    fine_tune_job=None,
    model_name="chat",
    image="ghcr.io/kubetune/server:0.1.0",
)


def env_of(dep: dict) -> dict:
    return {
        e["name"]: e.get("value", e.get("valueFrom"))
        for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_deployment_name_labels_selector_and_role_only_on_the_object():
    dep = b.build_server_deployment(MD, REV, role=b.ROLE_CANARY)
    assert dep["metadata"]["name"] == "chat-abc123def0" and dep["metadata"]["namespace"] == "team-a"
    assert dep["metadata"]["labels"][b.LABEL_ROLE] == "canary"
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert b.LABEL_ROLE not in pod_labels
    # The selector is the revision's labels; the pods add only their engine (never selected on).
    assert {**dep["spec"]["selector"]["matchLabels"], LABEL_ENGINE: "builtin"} == pod_labels
    assert pod_labels[LABEL_OWNER] == "chat" and pod_labels[LABEL_REVISION] == "abc123def0"
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert dep["spec"]["replicas"] == 3 and dep["spec"]["progressDeadlineSeconds"] == 600
    stable = b.build_server_deployment(MD, REV, role=b.ROLE_STABLE, replicas=1)
    assert stable["spec"]["template"] == dep["spec"]["template"] and stable["spec"]["replicas"] == 1


def test_server_environment_follows_the_contract():
    env = env_of(b.build_server_deployment(MD, REV, role=b.ROLE_STABLE))
    assert env["KUBETUNE_MODEL_URI"] == "s3://models/base"
    assert env["KUBETUNE_ADAPTER_URI"] == "s3://models/ad"
    assert env["KUBETUNE_ADAPTER_DIGEST"] == "sha256:ff"
    assert env["KUBETUNE_REVISION"] == "abc123def0" and env["KUBETUNE_MODEL_NAME"] == "chat"
    assert env["KUBETUNE_PORT"] == "8080" and '"port": 8080' in env["KUBETUNE_SERVER_CONFIG"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["KUBETUNE_FAULT_ERROR_RATE"] == "0.2"
    # A start-up failure lands in the termination message, which a crash loop then quotes.
    assert env["KUBETUNE_TERMINATION_LOG"] == "/dev/termination-log"
    container = b.build_server_deployment(MD, REV, role=b.ROLE_STABLE)["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["terminationMessagePath"] == "/dev/termination-log"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (
            '{"outcome": "storage_error", "message": "cannot serve: x: not a folder"}',
            "cannot serve: x: not a folder",
        ),
        ("plain words\n", "plain words"),
        ('{"outcome": "other"}', '{"outcome": "other"}'),
        ("", None),
        (None, None),
    ],
)
def test_termination_text_takes_the_message_of_the_servers_json(raw, text):
    assert b.termination_text(raw) == text


def test_no_adapter_means_no_adapter_env_and_no_owner_without_uid():
    md = {
        **MD,
        "metadata": {"name": "chat"},
        "spec": {"model": {"baseModel": {"uri": "file:///m"}}},
    }
    rev = Revision("r1", "file:///m", None, None, None, "chat", "img:1")
    dep = b.build_server_deployment(md, rev, role=b.ROLE_STABLE)
    assert "KUBETUNE_ADAPTER_URI" not in env_of(dep) and "AWS_ACCESS_KEY_ID" not in env_of(dep)
    assert "ownerReferences" not in dep["metadata"] and "namespace" not in dep["metadata"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "img:1"


def test_probes_resources_and_security():
    pod = b.build_server_deployment(MD, REV, role=b.ROLE_STABLE, image="other:2")["spec"][
        "template"
    ]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "other:2" and c["command"] == ["python", "-m", "kubetune_server"]
    assert (
        c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert (
        c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        and c["resources"]["requests"]["cpu"] == "4"
    )
    assert (
        c["securityContext"]["allowPrivilegeEscalation"] is False
        and pod["securityContext"]["runAsNonRoot"]
    )
    assert (
        pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    )


def test_services_select_one_revision_or_all():
    rs = b.build_revision_service(MD, "abc123def0")
    assert (
        rs["metadata"]["name"] == "chat-abc123def0"
        and rs["spec"]["selector"][LABEL_REVISION] == "abc123def0"
    )
    ss = b.build_stable_service(MD)
    assert ss["metadata"]["name"] == "chat" and LABEL_REVISION not in ss["spec"]["selector"]
    assert ss["spec"]["ports"][0] == {
        "name": "http",
        "port": 80,
        "targetPort": "http",
        "protocol": "TCP",
    }
    pdb = b.build_pdb(MD, "abc123def0")
    assert (
        pdb["spec"]["maxUnavailable"] == 1
        and pdb["spec"]["selector"]["matchLabels"][LABEL_REVISION] == "abc123def0"
    )


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"aaa": 100}, [("chat-aaa", 100)]),
        ({"aaa": 90, "bbb": 10}, [("chat-aaa", 90), ("chat-bbb", 10)]),
        ({"aaa": 100, "bbb": 0, "ccc": 0}, [("chat-aaa", 100), ("chat-bbb", 0), ("chat-ccc", 0)]),
    ],
)
def test_httproute_weighted_backends(weights, expected):
    route = b.build_httproute(MD, weights)
    assert (
        route["apiVersion"] == "gateway.networking.k8s.io/v1"
        and route["metadata"]["name"] == "chat"
    )
    backends = route["spec"]["rules"][0]["backendRefs"]
    assert [(x["name"], x["weight"]) for x in backends] == expected
    assert all(x["port"] == 80 for x in backends)
    assert route["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "gw",
            "namespace": "infra",
            "sectionName": "https",
        }
    ]
    assert route["spec"]["hostnames"] == ["chat.example.com"]


def test_built_objects_are_valid_kubernetes():
    kv = pytest.importorskip("kubernetes_validate")
    for obj in (
        b.build_server_deployment(MD, REV, role=b.ROLE_STABLE),
        b.build_revision_service(MD, "abc123def0"),
        b.build_stable_service(MD),
        b.build_pdb(MD, "abc123def0"),
    ):
        try:
            kv.validate(obj, "1.30", strict=True)
        except kv.utils.SchemaNotFoundError:  # pragma: no cover - schema not bundled
            pytest.skip("no schema for 1.30")


def test_serving_pods_do_not_mount_a_service_account_token():
    """Issue 13: the server makes no Kubernetes API call, so its pods carry no token."""
    pod = b.build_server_deployment(MD, REV, role=b.ROLE_STABLE)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False


def test_api_key_comes_only_from_the_secret():
    md = {**MD, "spec": {**MD["spec"], "server": {"apiKeySecret": {"name": "chat-keys"}}}}
    dep = b.build_server_deployment(md, REV, role=b.ROLE_STABLE)
    assert env_of(dep)[b.API_KEY_ENV] == {"secretKeyRef": {"name": "chat-keys", "key": "apiKey"}}
    assert b.API_KEY_ENV not in env_of(b.build_server_deployment(MD, REV, role=b.ROLE_STABLE))


def test_revision_names_of_specs_without_an_api_key_are_unchanged():
    from kubetune.api.modeldeployment import ModelDeploymentSpec
    from kubetune.rollout.revisions import resolve

    spec = ModelDeploymentSpec.model_validate(MD["spec"])
    keyed = ModelDeploymentSpec.model_validate(
        {**MD["spec"], "server": {**MD["spec"]["server"], "apiKeySecret": {"name": "k"}}}
    )
    # Pinned: the name this spec had before apiKeySecret existed (no surprise canary).
    assert resolve(spec, "chat").name == "98a312b64b"
    assert resolve(keyed, "chat").name != resolve(spec, "chat").name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            '{"status": "failed", "reason": "AdapterDigestMismatch", "message": "s3://a: adapter digest sha256:bb is not sha256:aa"}',
            (
                "AdapterDigestMismatch",
                "adapter digest mismatch: s3://a: adapter digest sha256:bb is not sha256:aa",
            ),
        ),
        (
            '{"status": "failed", "reason": "AdapterDigestMismatch", "foundDigest": "sha256:bb", "expectedDigest": "sha256:aa"}',
            (
                "AdapterDigestMismatch",
                "adapter digest mismatch: adapter digest sha256:bb is not sha256:aa",
            ),
        ),
        ('{"status": "loading"}', None),
        ('{"status": "failed", "message": "cannot serve"}', None),
        ("not json", None),
        (None, None),
    ],
)
def test_readiness_failure_reads_the_digest_mismatch_off_readyz(raw, expected):
    assert b.readiness_failure(raw) == expected
