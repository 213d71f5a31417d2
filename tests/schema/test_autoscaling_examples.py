"""The autoscaling examples point at things that exist: a ModelDeployment, the server's metrics, its pods.

Covers, for each scaler in ``examples/autoscaling/`` (an HPA, a KEDA ScaledObject):
- its scaleTargetRef is a ModelDeployment of ``examples/`` (apiVersion, kind and name), never
  a revision's Deployment (the operator owns those replica counts);
- every ``kubetune_server_*`` metric it names is one the server exports (a renamed metric
  would leave the scaler without data and the model at its minimum);
- the KEDA queries' pod pattern matches the pods of the example ModelDeployment's revisions
  (Deployment name from the real builder, plus a ReplicaSet hash and a pod suffix) and no
  pod of another ModelDeployment whose name merely starts the same.
The HPA is also created on the real API server (tests/cluster/test_autoscaling.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.rollout.builders import build_server_deployment
from kubetune.rollout.machine import revision_from_status
from kubetune_server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
SCALERS = sorted((REPO / "examples" / "autoscaling").glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _modeldeployments() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "ModelDeployment":
                out.setdefault(doc["metadata"]["name"], doc)
    return out


def _exported() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names |= {sample.name for sample in family.samples} | {family.name}
    return names


def test_there_is_an_hpa_and_a_keda_example() -> None:
    kinds = {doc["kind"] for path in SCALERS for doc in _docs(path)}
    assert kinds == {"HorizontalPodAutoscaler", "ScaledObject"}


@pytest.mark.parametrize("path", SCALERS, ids=lambda p: p.name)
def test_scaler_targets_an_example_modeldeployment_with_exported_metrics(path: Path) -> None:
    mdeps = _modeldeployments()
    for doc in _docs(path):
        ref = doc["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("kubetune.io/v1alpha1", "ModelDeployment")
        assert ref["name"] in mdeps, f"{path.name}: no ModelDeployment {ref['name']} in examples/"
        named = set(re.findall(r"kubetune_server_\w+", yaml.safe_dump(doc)))
        assert named, f"{path.name} names no kubetune_server metric"
        assert named <= _exported(), named - _exported()


def test_keda_pod_pattern_matches_the_revisions_pods_only() -> None:
    (keda,) = [d for p in SCALERS for d in _docs(p) if d["kind"] == "ScaledObject"]
    md = {**_modeldeployments()[keda["spec"]["scaleTargetRef"]["name"]]}
    md["metadata"] = {**md["metadata"], "namespace": "support"}
    rev = revision_from_status({"name": "0123456789", "modelUri": "s3://m/base"}, "support-bot")
    deployment = build_server_deployment(md, rev, role="stable", replicas=1)["metadata"]["name"]
    pod = f"{deployment}-5d8f7c9b4-x2x7q"
    other = pod.replace("support-bot-", "support-bot-v2-", 1)
    for trigger in keda["spec"]["triggers"]:
        pattern = re.search(r'pod=~"([^"]+)"', trigger["metadata"]["query"]).group(1)
        assert re.fullmatch(pattern, pod), (pattern, pod)
        assert not re.fullmatch(pattern, other), (pattern, other)
