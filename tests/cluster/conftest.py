"""Fixtures of the cluster tier: the operator installed by its Helm chart, assets in S3.

- ``kubetune_release``: ``helm install kubetune charts/kubetune`` into ``kubetune-system`` through
  a real Helm engine (helm-python-sdk) against the real API server; the chart's operator
  Deployment (two replicas, Kopf peering) then runs on the test node as pods, with the chart's
  ServiceAccount token mounted, so every call it makes passes the real RBAC authorizer.
- ``cluster_assets``: the tiny base model and the synthetic dataset, uploaded to moto's S3.
- :func:`storage_secret`: the S3 keys as a Secret in a test namespace.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.cluster.controlplane import ControlPlane
from tests.plugins.cluster import describe_pods

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
OPERATOR_NAMESPACE = "kubetune-system"
BUCKET = "cluster"


@dataclass
class Release:
    """The installed chart: where the operator runs and who it runs as."""

    namespace: str
    deployment: str
    service_account: str
    manifest: str


@pytest.fixture(scope="session")
def kubetune_release(control_plane: ControlPlane, cluster_nodes: Any) -> Iterator[Release]:
    """The operator, installed by the chart and Available (its pods run on the test node)."""
    import helm_python as helm

    helm.disable_logging()
    config = helm.Config(
        kubeconfig_path=str(control_plane.kubeconfig), namespace=OPERATOR_NAMESPACE
    )
    try:
        release = config.install(
            str(CHART),
            "kubetune",
            {"image": {"tag": "test"}, "logLevel": "info", "peering": {"lifetime": 30}},
            namespace=OPERATOR_NAMESPACE,
            create_namespace=True,
            wait="watcher",
            timeout=240,
        )
    except Exception as exc:
        # Helm only says "timed out": name the pods' states and the runner's log instead.
        raise AssertionError(
            f"helm install of the chart failed: {exc}\n"
            f"{describe_pods(control_plane, OPERATOR_NAMESPACE, cluster_nodes)}"
        ) from exc
    try:
        yield Release(
            namespace=OPERATOR_NAMESPACE,
            deployment="kubetune",
            service_account="kubetune",
            manifest=str(getattr(release, "manifest", "")),
        )
    finally:
        config.uninstall("kubetune", wait="watcher", timeout=120, ignore_not_found=True)
        config.close()


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="session")
def cluster_assets(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """s3:// URIs of the tiny base model and the training data (plus the endpoint)."""
    from kubetune.local.demo import DemoSettings, prepare

    work = tmp_path_factory.mktemp("cluster-assets")
    paths = prepare(work, DemoSettings.fast(), say=lambda _text: None)
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    for file in paths["base"].rglob("*"):
        if file.is_file():
            s3.upload_file(str(file), BUCKET, f"models/base/{file.relative_to(paths['base'])}")
    s3.upload_file(str(paths["train"]), BUCKET, "data/train.jsonl")
    return {
        "endpoint": s3_endpoint,
        "base": f"s3://{BUCKET}/models/base",
        "train": f"s3://{BUCKET}/data/train.jsonl",
        "bucket": BUCKET,
    }


def storage_secret(namespace: str, name: str = "s3-keys") -> dict[str, Any]:
    """The S3 keys as a Secret (a spec names it; keys never go in a spec)."""

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {"AWS_ACCESS_KEY_ID": b64("testing"), "AWS_SECRET_ACCESS_KEY": b64("testing")},
    }
