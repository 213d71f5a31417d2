"""RBAC for real: who the operator is, and that the authorizer never had to deny it.

Runs after the FineTuneJob and ModelDeployment stories (files run in name order), so the audit
log holds every request the chart-installed operator made in the session.
"""

from __future__ import annotations

from typing import Any

from kubetune.k8s.client import KubeClient
from tests.cluster.conftest import Release
from tests.cluster.controlplane import ControlPlane


async def test_serviceaccount_kubeconfig_authenticates_as_that_account(
    control_plane: ControlPlane, cluster_namespace: str
) -> None:
    """A token kubeconfig authenticates as its ServiceAccount (it used to call as anonymous)."""
    control_plane.create(
        f"/api/v1/namespaces/{cluster_namespace}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
    )
    kubeconfig = control_plane.kubeconfig_for(cluster_namespace, "reader")
    client = KubeClient.from_kubeconfig(str(kubeconfig))
    try:
        _, review = await client.request(
            "POST",
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )
    finally:
        await client.close()
    assert (
        review["status"]["userInfo"]["username"]
        == f"system:serviceaccount:{cluster_namespace}:reader"
    )


def _denials(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for event in events:
        message = (event.get("responseStatus") or {}).get("message", "")
        # NamespaceLifecycle admission (a test namespace being deleted) is not the authorizer.
        if "because it is being terminated" in message:
            continue
        out.append(f"{event.get('verb')} {event.get('requestURI')}: {message}")
    return out


def test_operator_runs_as_the_charts_service_account_and_is_never_denied(
    control_plane: ControlPlane, kubetune_release: Release
) -> None:
    user = f"system:serviceaccount:{kubetune_release.namespace}:{kubetune_release.service_account}"
    made = control_plane.audit_events(user=user)
    assert len(made) > 10, (
        f"no requests by {user}: the operator did not run with the chart's account"
    )
    verbs = {e.get("verb") for e in made}
    assert {"list", "watch", "create", "patch"} <= verbs, verbs
    denied = _denials(control_plane.audit_events(user=user, code=403))
    assert not denied, "the chart's RBAC denied the operator:\n" + "\n".join(denied[:20])
