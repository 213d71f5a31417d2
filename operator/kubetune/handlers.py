"""Kopf handlers: decorators only; each delegates to finetune/, rollout/ and k8s/.

Run with ``kopf run -m kubetune.handlers`` (the Helm chart does) or ``kubetune operator``.
"""

from __future__ import annotations

import kopf

# ---------------------------------------------------------------------------------------------
# Startup (shared)
# ---------------------------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: object) -> None:
    """Keep Kopf's bookkeeping in annotations, so status holds only our schema's fields."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.io", key="last-handled-configuration"
    )
    settings.posting.level = 20  # INFO and above become Kubernetes Events


# ---------------------------------------------------------------------------------------------
# FineTuneJob
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# ModelDeployment
# ---------------------------------------------------------------------------------------------
