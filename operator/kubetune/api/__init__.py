"""The kubetune API: spec/status models of both custom resources, CRD generation, conditions.

The pydantic models here are the single source of truth: the CRDs in ``crds/`` are generated
from them (``kubetune crds``), the operator and the local runtime parse manifests with them, and
``kubectl explain`` shows their field descriptions.
"""

from kubetune.api.common import API_VERSION, GROUP, VERSION
from kubetune.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.modeldeployment import (
    ModelDeployment,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
]
