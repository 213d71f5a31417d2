"""KubeClient.from_kubeconfig reads every credential form a kubeconfig can hold.

Bug found by the real API server (the cluster tier's scale bench): with kubernetes>=35 the
loader keeps a kubeconfig's token under ``api_key["BearerToken"]``; we read only
``api_key["authorization"]``, so a token kubeconfig made every operator call as
system:anonymous (403 on each reconcile, while Kopf's own watches looked healthy).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from kubetune.k8s.client import KubeClient


def _kubeconfig(tmp_path: Path, user: dict) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True},
            }
        ],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_kubeconfig_token_is_sent_not_dropped(tmp_path: Path) -> None:
    client = KubeClient.from_kubeconfig(_kubeconfig(tmp_path, {"token": "sa-token-123"}))
    assert client._headers()["Authorization"] == "Bearer sa-token-123"


def test_kubeconfig_token_file_is_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    client = KubeClient.from_kubeconfig(_kubeconfig(tmp_path, {"tokenFile": str(token_file)}))
    assert client._headers()["Authorization"] == "Bearer from-a-file"


def test_kubeconfig_without_credentials_sends_no_authorization(tmp_path: Path) -> None:
    client = KubeClient.from_kubeconfig(_kubeconfig(tmp_path, {}))
    assert "Authorization" not in client._headers()
