"""Startup settings for running the operator in a cluster (the Helm chart loads this module).

The chart starts ``kopf run --module=kubetune.handlers --module=kubetune.startup``; the
handlers stay decorators for the two kinds, and everything about *how* the operator runs in a
Deployment lives here, driven by environment variables the chart sets:

``KUBETUNE_METRICS_PORT``
    Serve the operator's own metrics (:mod:`kubetune.metrics`) on this port.
``KUBETUNE_PEERING_OLDEST_FIRST=true``
    Rank peers by start time. Kopf pauses *every* peer that sees another one of equal priority,
    so replicas of one Deployment (all started with the same arguments) would all stand still.
    The earlier a replica started, the higher its priority: the oldest one works, the others
    stand by, and during a rolling upgrade the old version keeps working until it exits (Kopf
    removes it from the peering on SIGTERM) instead of two versions reconciling at once.
Also here: the per-phase gauges and the rollout/rollback/restart counters of
:mod:`kubetune.metrics`, derived from the objects' status as it changes (watch events), so the
reconcilers need no metrics code beyond ``metrics.reconcile(kind)`` around a reconcile.

``KUBETUNE_SCANNING=false``
    Namespace-scoped installs (``watchNamespaces``) have Roles only, so the operator may not
    list Namespaces or watch CRDs (both cluster-scoped). Kopf would try, log a warning and fall
    back; disabling its scanning declares that restricted mode instead.
"""

from __future__ import annotations

import os
import time

import kopf

from kubetune import metrics


@kopf.on.startup()
def cluster_runtime(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: object) -> None:
    """Metrics endpoint, peering rank and scanning mode from the chart's environment."""
    port = metrics.serve_from_env()
    if port is not None:
        logger.info(f"Operator metrics on :{port}/metrics")
    if os.environ.get("KUBETUNE_PEERING_OLDEST_FIRST", "").lower() == "true":
        # Negative milliseconds since the epoch: earlier start, higher priority. Ties need two
        # replicas starting in the same millisecond; Kopf then pauses both until one restarts.
        settings.peering.priority = -int(time.time() * 1000)
    if os.environ.get("KUBETUNE_SCANNING", "").lower() == "false":
        settings.scanning.disabled = True


@kopf.on.event("kubetune.io", "v1alpha1", "finetunejobs")
def finetunejob_metrics(event: dict, namespace: str, name: str, status: dict, **_: object) -> None:
    """FineTuneJobs by phase; restarts by reason."""
    if event.get("type") == "DELETED":
        metrics.forget_status("FineTuneJob", namespace, name)
    else:
        metrics.observe_status("FineTuneJob", namespace, name, dict(status))


@kopf.on.event("kubetune.io", "v1alpha1", "modeldeployments")
def modeldeployment_metrics(
    event: dict, namespace: str, name: str, status: dict, **_: object
) -> None:
    """ModelDeployments by phase; promotions and rollbacks."""
    if event.get("type") == "DELETED":
        metrics.forget_status("ModelDeployment", namespace, name)
    else:
        metrics.observe_status("ModelDeployment", namespace, name, dict(status))
