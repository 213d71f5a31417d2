"""Kopf handlers: decorators only; each delegates to finetune/, rollout/ and k8s/.

Run with ``kopf run -m kubetune.handlers`` (the Helm chart does) or ``kubetune operator``.
"""

from __future__ import annotations

import os

import kopf

from kubetune.api.defaults import load_defaults

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
# Level-triggered: every event about a FineTuneJob, its Jobs or their pods only *triggers* a
# reconcile of that FineTuneJob in a coalescing per-key queue (kubetune.k8s.queue); the
# reconcile recomputes everything from scratch (kubetune.k8s.finetunejobs -> finetune.plan).
# Only on.event handlers: Kopf keeps no progress annotations and adds no finalizer to
# FineTuneJobs (children are garbage-collected through ownerReferences; a Kopf timer would add
# a finalizer). The periodic resync is the queue's delayed re-run (FineTuneJobReconciler).

FTJ_RESOURCE = {"group": "kubetune.io", "version": "v1alpha1", "plural": "finetunejobs"}
FTJ_CHILD_LABELS = {"kubetune.io/kind": "FineTuneJob"}


@kopf.on.startup()
async def finetunejob_startup(memo: kopf.Memo, **_: object) -> None:
    """Create the FineTuneJob reconciler and its work queue in the operator's event loop."""
    from kubetune import metrics
    from kubetune.k8s.client import get_client
    from kubetune.k8s.finetunejobs import FineTuneJobReconciler
    from kubetune.k8s.queue import WorkQueue

    reconciler = FineTuneJobReconciler(
        await get_client(), defaults=load_defaults(os.environ)
    )

    async def work(key: object) -> float | None:
        namespace, name = key  # type: ignore[misc]
        with metrics.reconcile("FineTuneJob"):
            return await reconciler.reconcile(namespace, name)

    memo.finetunejobs = WorkQueue(work)


@kopf.on.cleanup()
async def finetunejob_cleanup(memo: kopf.Memo, **_: object) -> None:
    """Stop pending FineTuneJob work."""
    queue = getattr(memo, "finetunejobs", None)
    if queue is not None:
        await queue.close()


@kopf.on.event(**FTJ_RESOURCE)
async def finetunejob_event(
    event: dict, namespace: str, name: str, memo: kopf.Memo, **_: object
) -> None:
    """Any FineTuneJob event (incl. the initial listing on start): reconcile it."""
    if event.get("type") == "DELETED":
        memo.finetunejobs.forget((namespace, name))
        return
    memo.finetunejobs.trigger((namespace, name))


@kopf.on.event(group="batch", version="v1", plural="jobs", labels=FTJ_CHILD_LABELS)
async def finetunejob_job_event(labels: dict, namespace: str, memo: kopf.Memo, **_: object) -> None:
    """A validate/train Job changed: reconcile its FineTuneJob."""
    owner = labels.get("kubetune.io/owner")
    if owner:
        memo.finetunejobs.trigger((namespace, owner))


@kopf.on.event(version="v1", plural="pods", labels=FTJ_CHILD_LABELS)
async def finetunejob_pod_event(labels: dict, namespace: str, memo: kopf.Memo, **_: object) -> None:
    """A trainer pod changed (waiting, unschedulable, terminated): reconcile its FineTuneJob."""
    owner = labels.get("kubetune.io/owner")
    if owner:
        memo.finetunejobs.trigger((namespace, owner))


# ---------------------------------------------------------------------------------------------
# ModelDeployment
# ---------------------------------------------------------------------------------------------
# Same pattern as FineTuneJob: events only trigger a level-triggered reconcile of the
# ModelDeployment in a coalescing per-key queue; kubetune.k8s.deployments.reconcile observes,
# asks the pure state machine (kubetune.rollout.machine.step), writes status once, then acts. The
# machine's Requeue is the queue's delayed re-run (it always asks for one, 30 s when steady), so
# no Kopf timer is needed -- and none is used, because a timer makes Kopf put a finalizer on
# every ModelDeployment. Everything the machine remembers is in status (restarts continue).

MDEP_RESOURCE = {"group": "kubetune.io", "version": "v1alpha1", "plural": "modeldeployments"}
MDEP_CHILD_LABELS = {"kubetune.io/kind": "ModelDeployment"}


@kopf.on.startup()
async def modeldeployment_startup(memo: kopf.Memo, **_: object) -> None:
    """Create the ModelDeployment work queue in the operator's event loop."""
    from kubetune import metrics
    from kubetune.k8s.client import get_client
    from kubetune.k8s.deployments import reconcile
    from kubetune.k8s.queue import WorkQueue

    client = await get_client()
    # The chart's pod defaults (KUBETUNE_POD_DEFAULTS): a bad value stops the start-up here.
    defaults = load_defaults(os.environ)

    async def work(key: object) -> float | None:
        namespace, name = key  # type: ignore[misc]
        with metrics.reconcile("ModelDeployment"):
            return await reconcile(client, namespace, name, defaults)

    memo.modeldeployments = WorkQueue(work)


@kopf.on.cleanup()
async def modeldeployment_cleanup(memo: kopf.Memo, **_: object) -> None:
    """Stop pending ModelDeployment work and close the metric scrapers' sessions."""
    from kubetune.k8s.deployments import close_sessions

    queue = getattr(memo, "modeldeployments", None)
    if queue is not None:
        await queue.close()
    await close_sessions()


@kopf.index(**MDEP_RESOURCE)
async def modeldeployment_by_finetunejob(
    spec: dict, namespace: str, name: str, **_: object
) -> dict | None:
    """(namespace, FineTuneJob) -> ModelDeployments serving its artifact."""
    ref = ((spec.get("model") or {}).get("fineTuneJobRef") or {}).get("name")
    return {(namespace, ref): name} if ref else None


@kopf.on.event(**MDEP_RESOURCE)
async def modeldeployment_event(
    event: dict, namespace: str, name: str, memo: kopf.Memo, **_: object
) -> None:
    """Any ModelDeployment event (spec, annotations, the initial listing): reconcile it."""
    if event.get("type") == "DELETED":
        memo.modeldeployments.forget((namespace, name))
        return
    memo.modeldeployments.trigger((namespace, name))


@kopf.on.event(group="apps", version="v1", plural="deployments", labels=MDEP_CHILD_LABELS)
async def modeldeployment_deployment_event(
    labels: dict, namespace: str, memo: kopf.Memo, **_: object
) -> None:
    """A revision's Deployment changed (readiness, deadline): reconcile its ModelDeployment."""
    owner = labels.get("kubetune.io/owner")
    if owner:
        memo.modeldeployments.trigger((namespace, owner))


@kopf.on.event(**FTJ_RESOURCE)
async def modeldeployment_finetunejob_event(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    modeldeployment_by_finetunejob: kopf.Index,
    **_: object,
) -> None:
    """A FineTuneJob changed (e.g. Succeeded with an artifact): reconcile the ModelDeployments using it."""
    for mdep in modeldeployment_by_finetunejob.get((namespace, name), []):
        memo.modeldeployments.trigger((namespace, mdep))
