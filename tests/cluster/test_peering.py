"""Two operator replicas (the chart's default) under Kopf peering: only one acts at a time.

The API server's audit log attributes every request of a bound ServiceAccount token to the
pod that made it (``user.extra["authentication.kubernetes.io/pod-name"]``). Taken over the
whole session, the operator's writes (creates, patches, deletes of anything but its own
peering records and Events) must come from one replica at a time: the writer changes only when
an operator pod was deleted (the FineTuneJob story deletes the active one mid-run), never back
and forth.
"""

from __future__ import annotations

from typing import Any

from tests.cluster.conftest import Release
from tests.cluster.controlplane import ControlPlane

WRITES = {"create", "patch", "update", "delete"}
POD_NAME = "authentication.kubernetes.io/pod-name"


def _writer(event: dict[str, Any]) -> str:
    return ((event.get("user") or {}).get("extra") or {}).get(POD_NAME, ["?"])[0]


def test_only_one_operator_replica_writes_at_a_time(
    control_plane: ControlPlane, kubetune_release: Release
) -> None:
    user = f"system:serviceaccount:{kubetune_release.namespace}:{kubetune_release.service_account}"
    writes = sorted(
        (
            e
            for e in control_plane.audit_events(user=user)
            if e.get("verb") in WRITES
            and "/kopf.dev/" not in e.get("requestURI", "")
            and "/events" not in e.get("requestURI", "")
            and (e.get("responseStatus") or {}).get("code", 500) < 300
        ),
        key=lambda e: e["requestReceivedTimestamp"],
    )
    assert writes, "the operator wrote nothing this session"
    writers = [_writer(e) for e in writes]
    assert "?" not in writers, "audit events without the pod name: not a bound token"
    switches = sum(1 for a, b in zip(writers, writers[1:], strict=False) if a != b)
    operator_pods_deleted = [
        e
        for e in control_plane.audit_events()
        if e.get("verb") == "delete"
        and e.get("requestURI", "").startswith(
            f"/api/v1/namespaces/{kubetune_release.namespace}/pods/"
        )
        and (e.get("user") or {}).get("username", "").startswith("kubetune-test-admin")
    ]
    # Merge patches of disjoint fields (the trainer owns progress, the operator phase and
    # conditions) never need a resourceVersion: no write of the operator met a conflict.
    conflicts = [
        f"{e['verb']} {e['requestURI']}"
        for e in control_plane.audit_events(user=user, code=409)
        if e.get("verb") in ("patch", "update")
    ]
    assert not conflicts, conflicts
    assert switches <= len(operator_pods_deleted), (
        f"{switches} changes of the writing replica for {len(operator_pods_deleted)} operator pod deletions: "
        f"{[w for i, w in enumerate(writers) if i == 0 or writers[i - 1] != w]}"
    )
