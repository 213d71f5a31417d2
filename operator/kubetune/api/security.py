"""The security context of every pod kubetune builds, and the user its images run as.

One definition for the trainer's Jobs and the serving Deployments (and the images' Dockerfiles,
which a unit test compares with :data:`IMAGE_UID`). The pods meet the Kubernetes *restricted*
Pod Security Standard (docs/security.md).

NB: the pods set ``runAsNonRoot`` but no ``runAsUser``/``fsGroup``: the image's numeric
``USER 10001`` applies, which the kubelet verifies is not root. A fixed UID would be refused by
OpenShift's restricted SCC, which assigns each namespace its own UID range; the writable places
are emptyDirs, which every UID may write to, so no ``fsGroup`` is needed either.
"""

from __future__ import annotations

from typing import Any

# The numeric non-root user (and group) of kubetune's trainer, server and operator images:
# `USER 10001:10001` in each Dockerfile (tests/unit/test_images_static.py checks they agree).
IMAGE_UID = 10001


def pod_security_context() -> dict[str, Any]:
    """``spec.securityContext`` of a kubetune pod: non-root, the runtime's seccomp profile."""
    return {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    """A container's ``securityContext``: read-only root, no capabilities, no escalation."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
