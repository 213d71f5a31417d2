"""ModelDeployment phases (``status.phase``): the constants the rollout machine writes.

``modeldeployment.MdepPhase`` is the schema's enum of the same strings (a unit test keeps the
two equal). Argo CD health scripts and ``kubectl get mdep`` read them, so they never change.
"""

from __future__ import annotations

PENDING = "Pending"  # nothing deployed yet: the model is not resolvable (yet)
PROGRESSING = "Progressing"  # a first deploy or a canary is under way
PAUSED = "Paused"  # a canary holds at a step (pause step, annotation, inconclusive analysis)
HEALTHY = "Healthy"  # the stable revision serves, no canary
DEGRADED = "Degraded"  # stable unavailable, the model unresolvable for good, or an invalid spec
ROLLED_BACK = "RolledBack"  # the desired revision was rejected; stable serves
SCALED_TO_ZERO = "ScaledToZero"  # spec.replicas 0: stable keeps its place without pods

MDEP_PHASES: tuple[str, ...] = (
    PENDING,
    PROGRESSING,
    PAUSED,
    HEALTHY,
    DEGRADED,
    ROLLED_BACK,
    SCALED_TO_ZERO,
)
