"""The trainer's progress channel in a cluster: patch the own FineTuneJob's ``status``.

DESIGN.md, "Progress channel": the trainer pod runs under a per-job ServiceAccount whose Role
allows ``patch`` on exactly one object's ``finetunejobs/status`` (``resourceNames``). This
module sends a JSON merge patch of the trainer-owned status fields (``progress``, ``metrics``,
``checkpoints``, ``resumedFromStep``) to
``/apis/kubetune.io/v1alpha1/namespaces/<ns>/finetunejobs/<name>/status``.

It is deliberately synchronous and dependency-free (urllib + the in-cluster CA): the trainer
calls it from a background thread, and a training image should not need an async stack or the
kubernetes client for one PATCH. The ServiceAccount token is re-read on every call because
projected tokens rotate (kubelet refreshes the file well before expiry).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from kubetune.api.common import GROUP, VERSION
from kubetune.api.finetunejob import PLURAL

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TRAINER_STATUS_FIELDS = ("progress", "metrics", "checkpoints", "resumedFromStep")


class ProgressError(Exception):
    """A status patch failed; the message has the HTTP status and the API server's reason."""


def status_path(namespace: str, name: str) -> str:
    """The ``/status`` subresource path of a FineTuneJob."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"


@dataclass
class StatusPatcher:
    """Sends merge patches of the trainer-owned fields to one FineTuneJob's status."""

    api_url: str
    namespace: str
    name: str
    token_path: str | None = None
    ca_path: str | None = None
    timeout: float = 5.0

    @classmethod
    def in_cluster(cls, namespace: str, name: str) -> StatusPatcher:
        """Use the pod's ServiceAccount: KUBERNETES_SERVICE_HOST/PORT, token and CA files."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ProgressError(
                "KUBERNETES_SERVICE_HOST is not set: not running in a cluster (use KUBETUNE_REPORT=file:///... or none)"
            )
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return cls(
            api_url=f"https://{host}:{port}",
            namespace=namespace,
            name=name,
            token_path=f"{SA_DIR}/token",
            ca_path=f"{SA_DIR}/ca.crt",
        )

    def patch(self, fragment: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch ``{"status": fragment}``; returns the object the API server answered with.

        Only trainer-owned fields may be sent: the operator owns phase and conditions, and a
        patch touching them would be a bug on our side, so it is refused before any I/O.
        """
        foreign = sorted(set(fragment) - set(TRAINER_STATUS_FIELDS))
        if foreign:
            raise ProgressError(
                f"the trainer may only patch {TRAINER_STATUS_FIELDS}, not {foreign}"
            )
        body = json.dumps({"status": fragment}).encode()
        req = urllib.request.Request(
            self.api_url.rstrip("/") + status_path(self.namespace, self.name),
            data=body,
            method="PATCH",
            headers={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
        )
        if self.token_path:
            with open(self.token_path, encoding="utf-8") as fh:
                req.add_header("Authorization", f"Bearer {fh.read().strip()}")
        context = None
        if self.api_url.startswith("https://"):
            context = (
                ssl.create_default_context(cafile=self.ca_path)
                if self.ca_path
                else ssl.create_default_context()
            )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:
                data = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:500]
            raise ProgressError(f"PATCH {req.full_url}: HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ProgressError(f"PATCH {req.full_url}: {exc}") from exc
        return json.loads(data) if data else {}
