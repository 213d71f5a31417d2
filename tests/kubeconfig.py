"""Kubeconfig files for the test harnesses (kmock, the loopback control plane) and bench/.

Test-only: the product reads kubeconfigs (``KubeClient.from_kubeconfig``), it never writes one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


def write_kubeconfig(
    path: str | Path | None,
    server: str,
    ca: Path | None = None,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str = "default",
    user: str = "admin",
    mode: int | None = 0o600,
) -> Path:
    """A kubeconfig for ``server`` with client-certificate or token credentials; returns its path.

    ``path`` None: a new temporary file. ``ca`` None: no certificate authority (kmock serves
    plain HTTP on loopback). ``mode`` None leaves the file as created (kmock's dummy token is no
    secret, and the image tests mount that file into a container running as another uid).
    """
    if path is None:
        fd, path = tempfile.mkstemp(prefix="kubetune-kubeconfig-", suffix=".yaml")
        os.close(fd)
    path = Path(path)
    creds: dict[str, Any] = {}
    if cert is not None:
        creds = {"client-certificate": str(cert), "client-key": str(key)}
    if token is not None:
        creds = {"token": token}
    cluster: dict[str, Any] = {"server": server}
    if ca is not None:
        cluster["certificate-authority"] = str(ca)
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubetune-test", "cluster": cluster}],
        "users": [{"name": user, "user": creds}],
        "contexts": [
            {
                "name": user,
                "context": {"cluster": "kubetune-test", "user": user, "namespace": namespace},
            }
        ],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(doc))
    if mode is not None:
        path.chmod(mode)
    return path
