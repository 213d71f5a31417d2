"""The FineTuneJob reconcile's I/O: observe the children, plan (pure), write status, act.

One pass (Kubeflow Trainer style; STYLE.md, "Reconcile"):

1. read the FineTuneJob; stop if it is gone or being deleted;
2. observe only what the plan can use: the validate Job while the data is not validated yet,
   the training Job afterwards (plus their pods, for termination messages and waiting reasons);
3. ``kubetune.finetune.reconcile.plan(...)`` decides the complete status and the actions;
4. write the status (one merge patch to ``/status``, only when it changed) BEFORE acting: the
   plan is designed so that a crash after the write converges (a counted restart is never
   counted twice; a Job missing after "Validating" is simply created again);
5. act: create Jobs (idempotently, with the trainer RBAC and the headless Service they need),
   delete Jobs, post Events, delete the FineTuneJob when its TTL ran out;
6. return the requeue delay (the smallest ``Requeue``), for :class:`kubetune.k8s.queue.WorkQueue`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Mapping
from typing import Any

from kubetune.api import conditions as c
from kubetune.api.actions import events_first
from kubetune.api.common import API_VERSION, LABEL_KIND, LABEL_OWNER
from kubetune.api.defaults import PodDefaults
from kubetune.api.finetunejob import KIND
from kubetune.finetune import builders
from kubetune.finetune.reconcile import (
    ABSENT_JOB,
    TERMINAL,
    CreateJob,
    DeleteFineTuneJob,
    DeleteJob,
    Event,
    JobObservation,
    Plan,
    Requeue,
    observe_job,
    plan,
)
from kubetune.k8s.client import KubeClient

log = logging.getLogger(__name__)

RESYNC_SECONDS = 300.0
ENSURED_CACHE_LIMIT = 10_000

# Annotations of spec.storage.serviceAccountName that carry a workload identity; copied to the
# per-job ServiceAccount so the trainer reaches the bucket without keys.
WORKLOAD_IDENTITY_ANNOTATIONS = (
    "eks.amazonaws.com/role-arn",
    "eks.amazonaws.com/audience",
    "eks.amazonaws.com/sts-regional-endpoints",
    "iam.gke.io/gcp-service-account",
    "azure.workload.identity/client-id",
    "azure.workload.identity/tenant-id",
)


class FineTuneJobReconciler:
    """Reconciles FineTuneJobs by ``(namespace, name)`` through one :class:`KubeClient`."""

    def __init__(
        self,
        client: KubeClient,
        *,
        image: str | None = None,
        report: str = "k8s",
        defaults: PodDefaults | None = None,
    ) -> None:
        self.client = client
        self.image = image
        self.report = report
        # The chart's cluster-wide pod defaults (KUBETUNE_POD_DEFAULTS, read at start-up).
        self.defaults = defaults
        # Children whose supporting objects (RBAC, Service) this process already ensured, by
        # FineTuneJob uid: saves three round trips per Job creation on the hot path.
        self._ensured: set[tuple[str, str]] = set()

    async def _observe(self, namespace: str, name: str, with_pods: bool) -> JobObservation:
        job = await self.client.get("batch/v1", "Job", namespace, name)
        if job is None:
            return ABSENT_JOB
        pods: list[dict[str, Any]] = []
        if with_pods:
            pods = await self.client.list("v1", "Pod", namespace, labels={"job-name": name})
        return observe_job(job, pods)

    async def reconcile(
        self, namespace: str, name: str, now: datetime.datetime | None = None
    ) -> float | None:
        """One pass for the FineTuneJob ``namespace/name``; returns the requeue delay or None."""
        ftj = await self.client.get(API_VERSION, KIND, namespace, name)
        if ftj is None or (ftj.get("metadata") or {}).get("deletionTimestamp"):
            return None
        status = ftj.get("status") or {}
        terminal = status.get("phase") in TERMINAL
        validated = c.is_true(status.get("conditions"), c.DATA_VALIDATED)
        validate = train = ABSENT_JOB
        # Terminal phases only need to know whether something still runs (no pods needed).
        if not validated:
            validate = await self._observe(namespace, f"{name}-validate", with_pods=not terminal)
        if validated or terminal:
            train = await self._observe(namespace, f"{name}-train", with_pods=not terminal)
        result = plan(
            ftj,
            validate,
            train,
            now or datetime.datetime.now(datetime.UTC),
            image=self.image,
            report=self.report,
            defaults=self.defaults,
        )
        await self.execute(ftj, result)
        delays = [a.seconds for a in result.actions if isinstance(a, Requeue)]
        if not delays and result.status.get("phase") not in TERMINAL:
            # Level-triggered safety net: look again now and then even without events.
            delays.append(RESYNC_SECONDS)
        return min(delays) if delays else None

    async def execute(self, ftj: Mapping[str, Any], result: Plan) -> None:
        """Write the status (if changed), then carry out the actions in order."""
        meta = ftj["metadata"]
        ns, name = meta.get("namespace"), meta["name"]
        await self.client.patch_status(
            API_VERSION, KIND, ns, name, ftj.get("status") or {}, result.status
        )
        for action in events_first(result.actions):
            if isinstance(action, CreateJob):
                await self._create_job(ftj, action.manifest)
            elif isinstance(action, DeleteJob):
                if action.name:
                    gone = await self.client.delete(
                        "batch/v1", "Job", ns, action.name, propagation="Background"
                    )
                    log.info("deleted Job %s/%s (%s): %s", ns, action.name, action.reason, gone)
            elif isinstance(action, Event):
                await self.client.post_event(ftj, action.type, action.reason, action.message)
            elif isinstance(action, DeleteFineTuneJob):
                log.info("deleting FineTuneJob %s/%s: %s", ns, name, action.reason)
                await self.client.delete(API_VERSION, KIND, ns, name)

    async def _create_job(self, ftj: Mapping[str, Any], manifest: dict[str, Any]) -> None:
        meta = ftj["metadata"]
        ns = meta.get("namespace")
        spec = builders.parse_spec(dict(ftj))
        key = (str(meta.get("uid")), manifest["metadata"]["name"])
        if key not in self._ensured:
            if self.report == "k8s":
                annotations, pull_secrets = await self._account_identity(ns, spec.account())
                # Independent objects: one round trip instead of three.
                rbac = builders.build_trainer_rbac(
                    dict(ftj),
                    service_account_annotations=annotations,
                    image_pull_secrets=pull_secrets,
                )
                await asyncio.gather(*(self.client.apply(obj) for obj in rbac))
            is_train = manifest["metadata"]["name"] == builders.train_job_name(dict(ftj))
            if is_train and spec.nodes > 1:
                await self.client.apply(builders.build_train_service(dict(ftj)))
            if len(self._ensured) > ENSURED_CACHE_LIMIT:
                # Only an optimisation (apply is idempotent): forget rather than grow forever.
                self._ensured.clear()
            self._ensured.add(key)
        job_name = manifest["metadata"]["name"]
        _, created = await self.client.create(manifest)
        log.info("Job %s/%s %s", ns, job_name, "created" if created else "already exists")
        if created:
            # The FineTuneJob may have been deleted while this pass ran (it read the object
            # before): a Job created after the garbage collector ran would be orphaned with a
            # dangling ownerReference until the collector's next sweep. Check and undo.
            owner = await self.client.get(API_VERSION, KIND, ns, meta["name"])
            if owner is None or (owner.get("metadata") or {}).get("uid") != meta.get("uid"):
                log.info(
                    "FineTuneJob %s/%s is gone: deleting the Job just created", ns, meta["name"]
                )
                await self.client.delete("batch/v1", "Job", ns, job_name, propagation="Background")

    async def _account_identity(
        self, namespace: str | None, account: str | None
    ) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """Workload-identity annotations and imagePullSecrets of ``spec.serviceAccountName``."""
        if not account:
            return {}, []
        sa = await self.client.get("v1", "ServiceAccount", namespace, account)
        have = ((sa or {}).get("metadata") or {}).get("annotations") or {}
        annotations = {k: v for k, v in have.items() if k in WORKLOAD_IDENTITY_ANNOTATIONS}
        return annotations, list((sa or {}).get("imagePullSecrets") or [])


def owner_of(obj: Mapping[str, Any]) -> str | None:
    """The FineTuneJob a child (Job, Pod) belongs to, from its ``kubetune.io/owner`` label."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if labels.get(LABEL_KIND) != KIND:
        return None
    return labels.get(LABEL_OWNER)
