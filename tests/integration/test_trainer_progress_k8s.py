"""The trainer's Kubernetes progress channel (kubetune.k8s.progress) against kmock over HTTP.

Covers: a merge patch of the trainer-owned fields lands in the FineTuneJob's ``status`` through
the ``/status`` subresource (spec untouched, operator-owned phase kept, nested fields merged
across patches); a patch touching operator-owned fields is refused before any request; an HTTP
error names the path and status; the background reporter drives the same patcher.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from kubetune.k8s.progress import ProgressError, StatusPatcher, status_path
from kubetune_trainer.reporting import BackgroundReporter

NS, NAME = "default", "tiny"


def _request(
    url: str, method: str, body: dict | None = None, ctype: str = "application/json"
) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def ftj(kube_api):
    base = f"{kube_api.url}/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs"
    obj = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "baseModel": {"uri": "file:///m"},
            "dataset": {"train": "file:///t"},
            "output": {"uri": "file:///o"},
        },
    }
    _request(base, "POST", obj)
    _request(
        f"{kube_api.url}{status_path(NS, NAME)}",
        "PATCH",
        {"status": {"phase": "Running"}},
        "application/merge-patch+json",
    )
    return lambda: _request(f"{base}/{NAME}", "GET")


def test_patches_merge_into_status_and_leave_spec_and_phase(kube_api, ftj):
    patcher = StatusPatcher(api_url=kube_api.url, namespace=NS, name=NAME)
    patcher.patch({"progress": {"step": 3, "totalSteps": 10}, "metrics": {"trainLoss": 2.5}})
    patcher.patch(
        {
            "progress": {"step": 4},
            "checkpoints": [{"step": 4, "uri": "file:///o/checkpoints/step-4"}],
            "resumedFromStep": 2,
        }
    )
    obj = ftj()
    assert obj["status"]["phase"] == "Running"
    assert obj["status"]["progress"] == {"step": 4, "totalSteps": 10}
    assert obj["status"]["metrics"] == {"trainLoss": 2.5}
    assert obj["status"]["checkpoints"][0]["step"] == 4 and obj["status"]["resumedFromStep"] == 2
    assert obj["spec"]["baseModel"] == {"uri": "file:///m"}
    assert (
        "PATCH",
        f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/{NAME}/status",
    ) in kube_api.requests()


def test_operator_owned_fields_are_refused_before_any_request(kube_api, ftj):
    before = len(kube_api.requests())
    with pytest.raises(ProgressError, match="may only patch"):
        StatusPatcher(api_url=kube_api.url, namespace=NS, name=NAME).patch({"phase": "Succeeded"})
    assert len(kube_api.requests()) == before and ftj()["status"]["phase"] == "Running"


def test_http_errors_name_the_path(kube_api, ftj):
    with pytest.raises(ProgressError, match=r"finetunejobs/missing/status: HTTP 404"):
        StatusPatcher(api_url=kube_api.url, namespace=NS, name="missing").patch(
            {"progress": {"step": 1}}
        )


def test_background_reporter_sends_the_newest_state_through_the_patcher(kube_api, ftj):
    patcher = StatusPatcher(api_url=kube_api.url, namespace=NS, name=NAME)

    class Channel:
        send = staticmethod(patcher.patch)

    rep = BackgroundReporter(Channel(), min_interval=3600)
    for step in range(1, 6):
        rep.report({"progress": {"step": step, "totalSteps": 5}})
    rep.report({"metrics": {"evalLoss": 0.3}}, urgent=True)
    rep.close()
    status = ftj()["status"]
    assert status["progress"] == {"step": 5, "totalSteps": 5} and status["metrics"] == {
        "evalLoss": 0.3
    }
    assert rep.failures == 0
