"""The operator image run with the chart's own Deployment (rendered by a real Helm engine).

Covers, as the image's UID 10001 on a read-only root (only the chart's /tmp emptyDir writable)
with every capability dropped: the operator starts against a Kubernetes API (kmock's emulator
on loopback, reached through a kubeconfig the test node provides in place of the in-cluster
service account), answers Kopf's /healthz on the chart's health port and the operator's
Prometheus metrics on the chart's metrics port, and stops on SIGTERM within the pod's grace
period.
"""

from __future__ import annotations

import time
from pathlib import Path

import helm_python as helm
import httpx
import pytest
import yaml

from tests.images.conftest import Pod
from tests.integration.server_harness import free_port

pytestmark = pytest.mark.images

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
KUBECONFIG_IN_POD = "/var/run/kubetune/kubeconfig"


def chart_deployment(values: dict) -> dict:
    """The operator Deployment the chart renders with ``values``."""
    helm.disable_logging()
    manifests = helm.Chart.load(CHART).render(values, name="kubetune", namespace="kubetune-system", is_install=True)
    docs = [d for path, text in manifests.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    return next(d for d in docs if d["kind"] == "Deployment")


def test_operator_image_starts_and_answers_health_and_metrics(built_images, kube_api, tmp_path, pods):
    health, metrics = free_port(), free_port()
    deployment = chart_deployment(
        {"replicas": 1, "peering": {"enabled": False}, "health": {"port": health}, "metrics": {"port": metrics}}
    )
    pod = Pod(
        deployment["spec"]["template"]["spec"],
        built_images["operator"],
        tmp_path / "pod",
        pod_fields={"metadata.name": "kubetune-0"},
        node_env={"KUBECONFIG": KUBECONFIG_IN_POD},
        node_files={Path(kube_api.kubeconfig): KUBECONFIG_IN_POD},
    )
    pods.append(pod)
    assert "--read-only" in pod.run.args and "--cap-drop=ALL" in pod.run.args
    deadline = time.monotonic() + 120
    while True:
        assert pod.running(), pod.log()[-4000:]
        try:
            if httpx.get(f"http://127.0.0.1:{health}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"no /healthz within 120 s:\n{pod.log()[-4000:]}"
        time.sleep(0.2)
    text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
    assert "kubetune_" in text, text[:2000]
    code, seconds = pod.stop()
    assert code == 0, pod.log()[-4000:]
    assert seconds < pod.grace_seconds
