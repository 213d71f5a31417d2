"""The Helm chart, rendered by a real Helm engine (helm-python-sdk's libhelm) under several values.

Covers:
- ``helm lint --strict`` passes; values.schema.json refuses bad values with a message naming
  the key (unknown key, replicas 0, a namespace that is not a DNS label, a bad pull policy);
- every rendered object, and every CRD the chart ships, validates with kubernetes-validate
  (strict: unknown fields are errors); objects of kinds it has no schema for (ServiceMonitor,
  Kopf's peerings) are checked against their CRD's schema or by shape;
- the chart's CRDs are the repo's crds/ (symlinks to the same bytes: one source, no drift);
- the operator Deployment: ``kopf run --module=kubetune.handlers``, liveness on Kopf's health
  endpoint (same port as ``--liveness``), non-root, read-only root filesystem, every capability
  dropped, no privilege escalation, resources set, metrics port, peering vs. standalone;
- RBAC: cluster-wide mode is one ClusterRole; namespace mode (watchNamespaces) has a Role per
  namespace and no cluster-scoped object at all; no wildcard, no Secret access anywhere;
- optional pieces appear only when asked for: ServiceMonitor, PodMonitor, NetworkPolicy, PDB
  (replicas > 1);
- the PodMonitor of the inference servers (issue 13): it selects the pods the rollout builder
  makes, in the watched namespaces, and gives their series every label the prometheus analysis
  provider's default queries select (``namespace`` from the Prometheus Operator, ``revision``
  relabelled from the pod label kubetune.io/revision), which nothing created before;
- cluster-wide pod defaults (values ``defaults``) reach the operator as KUBETUNE_POD_DEFAULTS,
  which it parses into the defaults its builders apply: images of the chart's appVersion unless
  set, pull secrets, GPU node selector and tolerations, with an object's own spec winning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.api.security import IMAGE_UID
from kubetune.rollout import analysis as an
from kubetune.rollout import builders
from kubetune.rollout.metricmaps import METRIC_MAPS
from kubetune.rollout.revisions import Revision

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
KUBE_VERSION = "1.30"
NAMESPACE = "kubetune-system"

helm.disable_logging()  # libhelm logs every followed symlink at INFO

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "single-standalone": {"replicas": 1, "peering": {"enabled": False}},
    "everything-on": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "serverMetrics": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
            "extraEgress": [{"ports": [{"port": 9090, "protocol": "TCP"}]}],
        },
        "image": {
            "repository": "registry.example.com/kubetune/operator",
            "tag": "0.1.0-rc1",
            "pullPolicy": "Always",
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
        "logLevel": "debug",
        "priorityClassName": "system-cluster-critical",
        "extraEnv": [{"name": "KUBETUNE_EXTRA", "value": "1"}],
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders (templates only; CRDs are separate in Helm)."""
    chart = helm.Chart.load(CHART)
    manifests = chart.render(values, name="kubetune", namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def chart_crds() -> list[dict[str, Any]]:
    out = []
    for path in sorted((CHART / "crds").glob("*.yaml")):
        out += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _schema_of(crd_kind: str) -> dict[str, Any]:
    crd = next(c for c in chart_crds() if c["spec"]["names"]["kind"] == crd_kind)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# A ModelDeployment and revision to build serving pods from (the PodMonitor must select them).
BUILDER_MD = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"},
    "spec": {"model": {"baseModel": {"uri": "s3://models/base"}}},
}
BUILDER_REV = Revision(
    name="abc123def0",
    model_uri="s3://models/base",
    adapter_uri=None,
    adapter_digest=None,
    fine_tune_job=None,
    model_name="chat",
    image="ghcr.io/kubetune/server:0.1.0",
)

RENDERED = {name: render(values) for name, values in VALUE_SETS.items()}


def test_chart_lints_strictly() -> None:
    for values in VALUE_SETS.values():
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
        errors = [m for m in report["messages"] if m["severity"] >= 2]
        assert errors == [] and report["errors"] == [], report


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid_kubernetes(name: str) -> None:
    objects = RENDERED[name]
    assert objects
    for obj in objects:
        group = obj["apiVersion"].split("/")[0]
        if group == "kopf.dev":
            jsonschema.Draft4Validator(_schema_of(obj["kind"])).validate(obj)
            assert set(obj) <= {"apiVersion", "kind", "metadata", "status"}
        elif obj["kind"] == "ServiceMonitor":
            assert obj["spec"]["endpoints"][0]["port"] == "metrics"
        elif obj["kind"] == "PodMonitor":
            assert obj["spec"]["podMetricsEndpoints"][0]["port"] == "http"
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "kubetune"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
            assert meta["namespace"], obj["kind"]


def test_chart_crds_are_valid_and_are_the_repo_crds() -> None:
    for crd in chart_crds():
        kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    for repo_crd in sorted((REPO / "crds").glob("*.yaml")):
        shipped = CHART / "crds" / repo_crd.name
        assert shipped.is_symlink(), f"{shipped} must be a symlink to {repo_crd} (one source)"
        assert shipped.resolve() == repo_crd.resolve()
        assert shipped.read_bytes() == repo_crd.read_bytes()
    loaded = {Path(c["name"]).name: c for c in helm.Chart.load(CHART).crds}
    assert {p.name for p in (REPO / "crds").glob("*.yaml")} <= set(loaded)


def _operator(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _by_kind(objects, "Deployment")
    return deployment


def test_operator_deployment_is_hardened_and_probed() -> None:
    deployment = _operator(RENDERED["defaults"])
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert container["command"] == ["kopf"]
    assert args[:3] == ["run", "--module=kubetune.handlers", "--module=kubetune.startup"]
    liveness = next(a for a in args if a.startswith("--liveness="))
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    assert liveness == f"--liveness=http://0.0.0.0:{port}/healthz"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["KUBETUNE_METRICS_PORT"]["value"] == "8081"
    assert not any("secretKeyRef" in json.dumps(e) for e in container["env"])


def test_peering_replicas_and_standalone() -> None:
    defaults = RENDERED["defaults"]
    deployment = _operator(defaults)
    assert deployment["spec"]["replicas"] == 2
    assert "--peering=kubetune" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    (peering,) = _by_kind(defaults, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "kubetune"
    assert _by_kind(defaults, "PodDisruptionBudget")[0]["spec"]["maxUnavailable"] == 1

    single = RENDERED["single-standalone"]
    args = _operator(single)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" in args and not any(a.startswith("--peering") for a in args)
    assert (
        _by_kind(single, "ClusterKopfPeering") == []
        and _by_kind(single, "PodDisruptionBudget") == []
    )


def _rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        rule for obj in objects if obj["kind"] in ("Role", "ClusterRole") for rule in obj["rules"]
    ]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rbac_has_no_wildcards_and_no_secrets(name: str) -> None:
    rules = _rules(RENDERED[name])
    assert rules
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        assert "secrets" not in rule["resources"], rule
        assert "resourceNames" not in rule or rule["resourceNames"]


@pytest.mark.parametrize("watch", [[], ["team-a", "team-b"]])
def test_reading_api_key_secrets_is_opt_in_and_get_only(watch: list[str]) -> None:
    """rbac.readApiKeySecrets (issue 13): the eval gate's one Secret read, nothing more."""
    objects = render({"watchNamespaces": watch, "rbac": {"readApiKeySecrets": True}})
    roles = [obj for obj in objects if obj["kind"] in ("Role", "ClusterRole")]
    secret_rules = [r for r in _rules(objects) if "secrets" in r["resources"]]
    assert len(secret_rules) == len(roles)  # one per Role (namespaced) or the ClusterRole
    for rule in secret_rules:
        assert rule == {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}


def test_namespaced_mode_has_only_roles_in_the_watched_namespaces() -> None:
    objects = RENDERED["namespaced"]
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    roles = _by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = _by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "kubetune", "namespace": NAMESPACE}
        ]
    assert sorted(p["metadata"]["namespace"] for p in _by_kind(objects, "KopfPeering")) == [
        "team-a",
        "team-b",
    ]
    args = _operator(objects)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert (
        "--namespace=team-a" in args
        and "--namespace=team-b" in args
        and "--all-namespaces" not in args
    )
    assert all(r["apiGroups"] != ["apiextensions.k8s.io"] for r in _rules(objects))


def test_cluster_mode_binds_one_cluster_role_to_the_service_account() -> None:
    objects = RENDERED["defaults"]
    (role,) = _by_kind(objects, "ClusterRole")
    (binding,) = _by_kind(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (sa,) = _by_kind(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert _by_kind(objects, "Role") == []
    args = _operator(objects)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args


def test_optional_objects_only_when_enabled() -> None:
    defaults = {o["kind"] for o in RENDERED["defaults"]}
    assert not {"ServiceMonitor", "PodMonitor", "NetworkPolicy"} & defaults
    objects = RENDERED["everything-on"]
    (pod_monitor,) = _by_kind(objects, "PodMonitor")
    assert pod_monitor["metadata"]["labels"]["release"] == "prometheus"
    (monitor,) = _by_kind(objects, "ServiceMonitor")
    (service,) = _by_kind(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["spec"]["selector"].items()
    (policy,) = _by_kind(objects, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 443, 6443, 9090} <= egress_ports
    container = _operator(objects)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/kubetune/operator:0.1.0-rc1"
    assert "--debug" in container["args"]


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"replicaCount": 3}, "replicaCount"),
        ({"replicas": 0}, "replicas"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"metrics": {"port": 70000}}, "port"),
        ({"defaults": {"trainerimage": "x"}}, "trainerimage"),
        ({"defaults": {"imagePullSecrets": ["regcred"]}}, "imagePullSecrets"),
        ({"defaults": {"gpuNodeSelector": {"pool": "not a label value"}}}, "gpuNodeSelector"),
        ({"defaults": {"gpuTolerations": [{"key": "gpu", "effect": "Never"}]}}, "effect"),
    ],
)
def test_values_schema_refuses_bad_values(values: dict[str, Any], fragment: str) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError) as info:
        chart.render(values, name="kubetune", namespace=NAMESPACE)
    assert fragment in str(info.value)


def test_packaged_chart_carries_the_crd_contents(tmp_path: Path) -> None:
    """`helm package` resolves the crds/ symlinks: the published .tgz holds the generated CRDs."""
    archive = helm.package(CHART, destination=tmp_path)
    chart = helm.Chart.load_archive(Path(archive).read_bytes())
    assert (
        chart.metadata["version"] == yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    )
    shipped = {Path(c["name"]).name: c["data"] for c in chart.crds}
    for repo_crd in sorted((REPO / "crds").glob("*.yaml")):
        data = shipped[repo_crd.name]
        text = data if isinstance(data, str) else bytes(data).decode()
        assert text == repo_crd.read_text()
    assert "kopf.dev-peerings.yaml" in shipped
    assert chart.render({}, name="kubetune", namespace=NAMESPACE)  # the archive renders too


def test_operator_image_runs_what_the_chart_runs() -> None:
    """operator-image/Dockerfile: same entrypoint and modules as the chart, the non-root UID the pod relies on."""
    dockerfile = (REPO / "operator-image" / "Dockerfile").read_text()
    entrypoint = json.loads(
        next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT"))[
            len("ENTRYPOINT") :
        ]
    )
    cmd = json.loads(
        next(line for line in dockerfile.splitlines() if line.startswith("CMD"))[len("CMD") :]
    )
    pod = _operator(RENDERED["defaults"])["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert entrypoint == container["command"]
    assert cmd[:3] == container["args"][:3]
    # No fixed UID in the chart: runAsNonRoot relies on the image's numeric USER.
    user = next(line for line in dockerfile.splitlines() if line.startswith("USER")).split()[1]
    assert user == f"{IMAGE_UID}:{IMAGE_UID}"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "runAsUser" not in pod["securityContext"]


def _operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    deployment = next(o for o in _by_kind(objects, "Deployment") if o["metadata"]["name"] == "kubetune")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_pod_defaults_reach_the_builders_through_the_operators_environment() -> None:
    from kubetune.api.defaults import load_defaults
    from kubetune.api.modeldeployment import ModelDeploymentSpec
    from kubetune.finetune.builders import build_train_job, build_validate_job
    from kubetune.rollout.builders import ROLE_STABLE, build_server_deployment
    from kubetune.rollout.revisions import resolve

    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    # Defaults of the chart: images of its own version, nothing else.
    plain = load_defaults(_operator_env(render({})))
    assert plain.trainer_image == f"ghcr.io/kubetune/trainer:{app_version}"
    assert plain.server_image == f"ghcr.io/kubetune/server:{app_version}"
    assert not plain.image_pull_secrets and not plain.gpu_node_selector

    values = {
        "defaults": {
            "trainerImage": "registry.example.com/kubetune/trainer:7",
            "serverImage": "registry.example.com/kubetune/server:7",
            "imagePullSecrets": [{"name": "regcred"}],
            "gpuNodeSelector": {"node-pool": "gpu", "nvidia.com/gpu.present": "true"},
            "gpuTolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        }
    }
    defaults = load_defaults(_operator_env(render(values)))
    ftj = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": {
            "baseModel": {"uri": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/demo"},
            "resources": {"gpus": 1, "gpuNodeSelector": {"node-pool": "h100"}},
        },
    }
    train = build_train_job(ftj, attempt=0, defaults=defaults)["spec"]["template"]["spec"]
    assert train["containers"][0]["image"] == "registry.example.com/kubetune/trainer:7"
    assert train["imagePullSecrets"] == [{"name": "regcred"}]
    # Key by key, the spec wins; the cluster fills the rest.
    assert train["nodeSelector"] == {"node-pool": "h100", "nvidia.com/gpu.present": "true"}
    assert {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in train["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in train["tolerations"]
    # The CPU-only validate pod gets the image and pull secrets, not the GPU placement.
    validate = build_validate_job(ftj, defaults=defaults)["spec"]["template"]["spec"]
    assert validate["containers"][0]["image"] == "registry.example.com/kubetune/trainer:7"
    assert validate["imagePullSecrets"] == [{"name": "regcred"}] and "nodeSelector" not in validate
    # The spec's own image and pull secrets win.
    ftj["spec"].update(image="mine/trainer:1", imagePullSecrets=[{"name": "mine"}])
    own = build_train_job(ftj, attempt=0, defaults=defaults)["spec"]["template"]["spec"]
    assert own["containers"][0]["image"] == "mine/trainer:1"
    assert own["imagePullSecrets"] == [{"name": "mine"}]
    kubernetes_validate.validate(build_train_job(ftj, attempt=0, defaults=defaults), KUBE_VERSION, strict=True)

    md = {"metadata": {"name": "chat", "namespace": "team-a"}, "spec": {"model": {"baseModel": {"uri": "s3://models/base"}}}}
    spec = ModelDeploymentSpec.model_validate(md["spec"])
    revision = resolve(spec, "chat", None, defaults)
    assert revision.image == "registry.example.com/kubetune/server:7"
    # A new cluster default that reaches the pods is a new revision (rolled out as a canary).
    assert revision.name != resolve(spec, "chat", None, plain).name
    pod = build_server_deployment(md, revision, role=ROLE_STABLE, defaults=defaults)["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/kubetune/server:7"
    assert pod["nodeSelector"] == values["defaults"]["gpuNodeSelector"]


# --- the inference servers' PodMonitor and the prometheus provider (issue 13) -----------------

# Labels the Prometheus Operator gives every PodMonitor target before the PodMonitor's own
# relabelings (prometheus-operator's generated scrape config).
PROMETHEUS_OPERATOR_TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job"}
# Labels of the engines' series themselves (docs/contracts.md, "Server metrics"; the metric
# maps' counter rules name the ones they read).
SERVER_SERIES_LABELS = {"model", "code", "le"} | {
    key
    for m in METRIC_MAPS.values()
    for rule in (m.requests, m.errors, m.fallback_requests, m.fallback_errors)
    if rule is not None
    for key in (*rule.labels, *rule.exclude)
}


def _query_label_names(promql: str) -> set[str]:
    return {
        name
        for body in re.findall(r"\{([^{}]*)\}", promql.replace("{{", "").replace("}}", ""))
        for name in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!=|!~|=)", body)
    }


def test_podmonitor_gives_the_revision_label_the_default_queries_select_issue_13():
    # The bug: the default queries selected revision="<hash>", and nothing in the chart or the
    # docs created a `revision` label, so the example canary never had data and rolled back at
    # its deadline. The PodMonitor must produce every label the queries select.
    (monitor,) = _by_kind(RENDERED["everything-on"], "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    relabelled = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    produced = PROMETHEUS_OPERATOR_TARGET_LABELS | set(relabelled) | SERVER_SERIES_LABELS
    queries = [
        *(q for m in METRIC_MAPS.values() for q in an.counter_queries(m).values()),
        *(q for m in METRIC_MAPS.values() for q in an.default_queries(m).values()),
    ]
    for query in queries:
        assert _query_label_names(query) <= produced, query
    assert {"namespace", "revision"} <= set().union(*map(_query_label_names, queries))

    # ... from the pod label the rollout builder really puts on the serving pods, on the port
    # the server really listens on, selecting exactly those pods.
    dep = builders.build_server_deployment(BUILDER_MD, BUILDER_REV, role=builders.ROLE_CANARY)
    template = dep["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    sanitized = {"__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", k): k for k in pod_labels}
    (source,) = relabelled["revision"]
    assert pod_labels[sanitized[source]] == BUILDER_REV.name
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = template["spec"]["containers"][0]["ports"]
    assert endpoint["port"] in {p["name"] for p in ports} and endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}


def test_podmonitor_watches_only_the_watched_namespaces():
    (monitor,) = _by_kind(
        render({**VALUE_SETS["namespaced"], "serverMetrics": {"podMonitor": {"enabled": True}}}),
        "PodMonitor",
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert monitor["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"
