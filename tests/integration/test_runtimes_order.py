"""Record, then act: both runtimes write the decided status before they act, for both kinds.

docs/contracts.md ("Record, then act") says why: status is the decision functions' memory, so a
process that dies between the two steps must leave the decision behind.

Aspects covered:

- operator, FineTuneJob and ModelDeployment: in the API server's own request log of one
  reconcile, the status patch comes first, then the Events, then the writes to other objects;
- local runtime, FineTuneJob and ModelDeployment: when the runtime dies at its first action
  (the store refuses the first child), the decided status is already on disk and no child is
  saved.
"""

from __future__ import annotations

import pytest

from kubetune.api.modeldeployment import ModelDeploymentSpec
from kubetune.k8s.deployments import reconcile as reconcile_modeldeployment
from kubetune.k8s.finetunejobs import FineTuneJobReconciler
from kubetune.local.deployments import DeploymentDriver
from kubetune.local.jobs import JobDriver
from kubetune.local.processes import Supervisor
from kubetune.local.store import Store
from kubetune.rollout.revisions import resolve

API = "kubetune.io/v1alpha1"
NS = "default"


def finetunejob() -> dict:
    return {
        "apiVersion": API,
        "kind": "FineTuneJob",
        "metadata": {"name": "ft", "namespace": NS},
        "spec": {
            "baseModel": {"uri": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/ft"},
        },
    }


def modeldeployment() -> dict:
    return {
        "apiVersion": API,
        "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": NS},
        "spec": {
            "model": {"baseModel": {"uri": "s3://models/base"}},
            "replicas": 1,
            "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"},
            "traffic": {"mode": "replicas"},
        },
    }


def revision_of(md: dict) -> str:
    return resolve(ModelDeploymentSpec.model_validate(md["spec"]), md["metadata"]["name"]).name


def writes_since(kube_api, mark: int) -> list[tuple[str, str]]:
    return [(m, p) for m, p in kube_api.requests()[mark:] if m not in ("GET", "HEAD")]


def recorded_first(writes: list[tuple[str, str]], status: tuple[str, str]) -> None:
    """The status patch, then the Events, then everything else (``api.actions.events_first``)."""
    assert writes[0] == status, writes
    kinds = ["event" if p.endswith("/events") else "other" for _, p in writes[1:]]
    assert "event" in kinds and "other" in kinds, writes
    assert kinds == sorted(kinds), writes  # every "event" before the first "other"


# --- the operator: the API server's request log ----------------------------------------------


async def test_operator_finetunejob_patches_status_before_creating_its_job(kube, kube_api):
    await kube.create(finetunejob())
    mark = len(kube_api.requests())
    await FineTuneJobReconciler(kube).reconcile(NS, "ft")
    writes = writes_since(kube_api, mark)
    recorded_first(writes, ("PATCH", f"/apis/{API}/namespaces/{NS}/finetunejobs/ft/status"))
    assert any(p.endswith("/jobs") for _, p in writes[1:]), "the validate Job is created after"


async def test_operator_modeldeployment_patches_status_before_creating_its_revision(kube, kube_api):
    md = modeldeployment()
    await kube.create(md)
    mark = len(kube_api.requests())
    await reconcile_modeldeployment(kube, NS, "chat")
    writes = writes_since(kube_api, mark)
    recorded_first(writes, ("PATCH", f"/apis/{API}/namespaces/{NS}/modeldeployments/chat/status"))
    assert ("POST", f"/apis/apps/v1/namespaces/{NS}/deployments") in writes[1:], writes
    obj = await kube.get(API, "ModelDeployment", NS, "chat")
    assert obj["status"]["stable"]["name"] == revision_of(md)


# --- the local runtime: dies at its first action ---------------------------------------------


class Died(Exception):
    """The runtime's process ends here (what a crash between status and action looks like)."""


class DiesAtFirstChild(Store):
    """A real store whose first child object (a Job, a Deployment) is never written."""

    def save_child(self, manifest: dict) -> None:
        raise Died(f"died before saving {manifest['kind']} {manifest['metadata']['name']}")


async def test_local_finetunejob_status_is_written_before_its_job(tmp_path):
    store = DiesAtFirstChild(tmp_path)
    store.apply(finetunejob())
    driver = JobDriver(store, Supervisor())
    with pytest.raises(Died, match="Job ft-validate"):
        await driver.reconcile(store.get("FineTuneJob", "ft"))
    status = store.get("FineTuneJob", "ft")["status"]
    assert status["phase"] == "Validating" and status["observedGeneration"] == 1
    assert driver.jobs == {}


async def test_local_modeldeployment_status_is_written_before_its_revision(tmp_path):
    store = DiesAtFirstChild(tmp_path)
    md = modeldeployment()
    store.apply(md)
    driver = DeploymentDriver(store, Supervisor())
    try:
        with pytest.raises(Died, match=f"Deployment chat-{revision_of(md)}"):
            await driver.reconcile(store.get("ModelDeployment", "chat"))
        status = store.get("ModelDeployment", "chat")["status"]
        assert status["stable"]["name"] == revision_of(md)
        assert driver.states["chat"].revisions == {}
    finally:
        await driver.shutdown()
