"""Names and labels on the real API server: the longest valid parents have valid children.

The same cases as tests/schema/test_child_names.py (which checks them against rules copied
from Kubernetes' validation code), here judged by kube-apiserver itself: every parent of the
longest and oddest valid name, and every child the builders make from it (Jobs, the Indexed
Job of a 128-node run, Services, RBAC, Deployments, PDB, HTTPRoute), is accepted by a
server-side dry-run create; one character more and the API server refuses the parent, naming
metadata.name.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune.k8s.client import resource_path
from tests.cluster.controlplane import ControlPlane
from tests.schema.test_child_names import (
    LONGEST_FTJS,
    LONGEST_MDEPS,
    ftj_children,
    mdep_children,
    name_of_length,
)


def dry_run(cp: ControlPlane, obj: dict[str, Any]) -> tuple[int, str]:
    meta = obj["metadata"]
    path = (
        resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        + "?dryRun=All&fieldValidation=Strict"
    )
    status, body = cp.request("POST", path, obj)
    return status, body.get("message", "") if isinstance(body, dict) else str(body)


def _in(namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = namespace
    return obj


@pytest.mark.parametrize(
    ("parent", "children"),
    [(LONGEST_FTJS[c], ftj_children) for c in sorted(LONGEST_FTJS)]
    + [(LONGEST_MDEPS[c], mdep_children) for c in sorted(LONGEST_MDEPS)],
    ids=[f"ftj-{c}" for c in sorted(LONGEST_FTJS)] + [f"mdep-{c}" for c in sorted(LONGEST_MDEPS)],
)
def test_longest_valid_name_and_its_children_are_accepted(
    control_plane: ControlPlane, cluster_namespace: str, parent: dict[str, Any], children: Any
) -> None:
    parent = _in(cluster_namespace, parent)
    status, message = dry_run(control_plane, parent)
    assert status < 300, f"{parent['kind']} {parent['metadata']['name']!r}: {message}"
    refused = []
    for child in children(parent):
        status, message = dry_run(control_plane, child)
        if status >= 300:
            refused.append(f"{child['kind']} {child['metadata']['name']}: {message}")
    assert not refused, "\n".join(refused)


@pytest.mark.parametrize("kind", ["ftj", "mdep"])
def test_one_character_more_is_refused_by_the_api_server(
    control_plane: ControlPlane, cluster_namespace: str, kind: str
) -> None:
    template = LONGEST_FTJS["single-node"] if kind == "ftj" else LONGEST_MDEPS["replicas"]
    parent = _in(cluster_namespace, template)
    parent["metadata"]["name"] = name_of_length(len(template["metadata"]["name"]) + 1)
    status, message = dry_run(control_plane, parent)
    assert status == 422, message
    assert "metadata.name" in message and "characters" in message, message


def test_queue_name_that_is_not_a_label_value_is_refused(
    control_plane: ControlPlane, cluster_namespace: str
) -> None:
    parent = _in(cluster_namespace, LONGEST_FTJS["single-node"])
    parent["spec"]["queueName"] = "My Queue!"
    status, message = dry_run(control_plane, parent)
    assert status == 422 and "queueName" in message, message
