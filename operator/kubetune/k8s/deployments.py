"""ModelDeployment reconcile I/O: observe the cluster, run the state machine, write status, act.

``reconcile(client, namespace, name)`` is the whole level-triggered reconcile the handlers call
for any event (the ModelDeployment itself, its Deployments, the referenced FineTuneJob) and on
the requeue the state machine asks for:

1. read the ModelDeployment (gone: nothing to do; children are garbage-collected);
2. observe: resolve the model (read the referenced FineTuneJob), list the revisions'
   Deployments and pods, scrape the stable and canary pods' /metrics (or query Prometheus), and
   find the traffic mode (Gateway API discovery);
3. ``kubetune.rollout.machine.step`` decides (pure);
4. one status patch, only when the status changed, BEFORE acting: the status is the machine's
   memory, so a decision is recorded before it is carried out (docs/contracts.md, "Record, then
   act"; the FineTuneJob reconcile and the local runtime do the same);
5. execute its actions in order: Deployments/Services/PDBs, the HTTPRoute or the shared
   Service, deletions, Events, annotation removal.

Returns the seconds until the machine wants to look again.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from pydantic import ValidationError

from kubetune.api.actions import events_first
from kubetune.api.common import API_VERSION, LABEL_ENGINE, LABEL_KIND, LABEL_OWNER, LABEL_REVISION
from kubetune.api.conditions import Reason, invalid_spec_message
from kubetune.api.defaults import PodDefaults
from kubetune.api.modeldeployment import KIND, ModelDeploymentSpec
from kubetune.k8s import scraping
from kubetune.k8s.client import ApiError, KubeClient
from kubetune.rollout import analysis as an
from kubetune.rollout import builders, machine, revisions, weights
from kubetune.rollout.revisions import resource_name

log = logging.getLogger(__name__)

GATEWAY_GROUP_VERSION = builders.GATEWAY_API_VERSION

# Container waiting reasons that waiting will not fix: the canary is rolled back at once.
FATAL_WAITING = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}

# Discovery answer per API server URL (the Gateway API is installed or not; re-checked hourly).
_gateway_cache: dict[str, tuple[float, bool]] = {}
_scrape_sessions: dict[int, aiohttp.ClientSession] = {}


async def gateway_api_available(client: KubeClient) -> bool:
    """Whether the API server serves HTTPRoute in gateway.networking.k8s.io/v1 (cached)."""
    import time

    cached = _gateway_cache.get(client.server)
    if cached and time.monotonic() - cached[0] < 3600:
        return cached[1]
    try:
        status, payload = await client.request(
            "GET", f"/apis/{GATEWAY_GROUP_VERSION}", allow=(404, 403)
        )
        found = status == 200 and any(
            r.get("name") == "httproutes" for r in (payload or {}).get("resources") or []
        )
    except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
        log.warning("Gateway API discovery failed: %s", exc)
        found = False
    _gateway_cache[client.server] = (time.monotonic(), found)
    return found


def _session() -> aiohttp.ClientSession:
    import asyncio

    loop = asyncio.get_running_loop()
    sess = _scrape_sessions.get(id(loop))
    if sess is None or sess.closed:
        sess = aiohttp.ClientSession()
        _scrape_sessions[id(loop)] = sess
    return sess


async def close_sessions() -> None:
    """Close the scrape sessions (operator cleanup)."""
    for sess in list(_scrape_sessions.values()):
        await sess.close()
    _scrape_sessions.clear()


# --- observing ---------------------------------------------------------------------------


def observe_revision(
    deployment: Mapping[str, Any] | None, pods: list[Mapping[str, Any]]
) -> machine.RevisionObservation:
    """Readiness and fatal failures of one revision from its Deployment and pods."""
    if deployment is None:
        return machine.RevisionObservation()
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    replicas = int(spec.get("replicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    available = ready >= 1 and (
        (conds.get("Available") or {}).get("status") == "True" or ready >= replicas
    )
    failure = failure_reason = None
    progressing = conds.get("Progressing") or {}
    if (
        progressing.get("status") == "False"
        and progressing.get("reason") == "ProgressDeadlineExceeded"
    ):
        failure = f"Deployment progress deadline exceeded: {progressing.get('message', '')}".strip()
        failure_reason = Reason.DEADLINE_EXCEEDED
    for pod in pods:
        found = _init_failure(pod)
        if found is not None:
            failure_reason, failure = found
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in FATAL_WAITING:
                # A crash loop's waiting message only says "back-off ... restarting"; the
                # last termination message says why (the server writes its start-up error).
                last = ((cs.get("lastState") or {}).get("terminated")) or {}
                why = builders.termination_text(last.get("message"))
                detail = (
                    f"exit code {last.get('exitCode')}: {why}"
                    if why and waiting["reason"] == "CrashLoopBackOff"
                    else waiting.get("message", "")
                )
                failure = f"pod {pod['metadata']['name']}: {waiting['reason']}: {detail}".rstrip(
                    ": "
                )
                failure_reason = (
                    Reason.IMAGE_PULL if "Image" in waiting["reason"] else Reason.CANARY_CRASHLOOP
                )
    return machine.RevisionObservation(
        # Pods that exist now (what status.replicas reports to a scaler), not the desired count.
        replicas=int(status.get("replicas") or 0),
        ready_replicas=ready,
        available=available,
        failure=failure,
        failure_reason=failure_reason,
    )


def _init_failure(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(reason, message)`` of an init container that keeps a pod from ever starting.

    The vLLM engine's fetch container (kubetune.rollout.builders): an adapter that is not the
    revision's artifact (its termination message has the built-in server's /readyz shape, read
    by ``builders.readiness_failure``) fails the revision at once with the digest it found; a
    crash loop or an image that cannot be pulled fails it as the main container's would. The
    main container meanwhile only waits in PodInitializing.
    """
    name = (pod.get("metadata") or {}).get("name")
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        state = cs.get("state") or {}
        terminated = state.get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
        if terminated and terminated.get("exitCode") not in (None, 0):
            mismatch = builders.readiness_failure(terminated.get("message"))
            if mismatch:
                return mismatch[0], f"pod {name}: init container {cs.get('name')}: {mismatch[1]}"
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            why = builders.termination_text(terminated.get("message")) if terminated else None
            detail = (
                f"exit code {terminated.get('exitCode')}: {why}"
                if why and waiting["reason"] == "CrashLoopBackOff"
                else waiting.get("message", "")
            )
            reason = Reason.IMAGE_PULL if "Image" in waiting["reason"] else Reason.CANARY_CRASHLOOP
            message = f"pod {name}: init container {cs.get('name')}: {waiting['reason']}: {detail}"
            return reason, message.rstrip(": ")
    return None


async def read_api_key(
    client: KubeClient, namespace: str, spec: ModelDeploymentSpec
) -> tuple[str | None, str | None]:
    """The serving pods' API key (``spec.server.apiKeySecret``) for the eval gate: ``(key, error)``.

    The one Secret the operator ever reads, and only with the chart's opt-in
    ``rbac.readApiKeySecrets`` (docs/security.md). The key stays in memory for the requests:
    the error messages name the Secret and key, never the value.
    """
    ref = spec.server.api_key_secret
    if ref is None:
        return None, None
    where = f"spec.server.apiKeySecret: Secret {ref.name!r} key {ref.key!r}"
    try:
        secret = await client.get("v1", "Secret", namespace, ref.name)
    except ApiError as exc:
        if exc.status == 403:
            return None, (
                f"{where}: the operator may not read Secrets; install the chart with "
                "rbac.readApiKeySecrets=true so the eval gate can send the key"
            )
        return None, f"{where}: {exc.status} {exc.reason}"
    raw = ((secret or {}).get("data") or {}).get(ref.key)
    if secret is None or raw is None:
        return None, f"{where}: not found"
    import base64

    try:
        return base64.b64decode(raw).decode().strip(), None
    except ValueError:
        return None, f"{where}: not base64-encoded UTF-8"


async def observe(
    client: KubeClient, md: Mapping[str, Any], defaults: PodDefaults | None = None
) -> machine.Observed:
    """Everything ``machine.step`` needs, read from the cluster (see the module docstring)."""
    meta = md["metadata"]
    ns, name = meta["namespace"], meta["name"]
    try:
        spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
    except ValidationError as exc:
        # machine.step reports it (status Degraded, the field named); nothing to observe.
        problem = revisions.ModelProblem(
            Reason.INVALID_SPEC, invalid_spec_message(exc), terminal=True
        )
        return machine.Observed(model=problem)
    ftj = None
    if spec.model.fine_tune_job_ref is not None:
        ftj = await client.get(API_VERSION, "FineTuneJob", ns, spec.model.fine_tune_job_ref.name)
    model = builders.check_pod_template(md, revisions.resolve(spec, name, ftj, defaults), defaults)

    selector = {LABEL_OWNER: name, LABEL_KIND: KIND}
    deployments = await client.list("apps/v1", "Deployment", ns, selector)
    pods = await client.list("v1", "Pod", ns, selector)
    pods_by_rev: dict[str, list[dict]] = {}
    for pod in pods:
        rev = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_REVISION)
        if rev:
            pods_by_rev.setdefault(rev, []).append(pod)
    observations: dict[str, machine.RevisionObservation] = {}
    engines: dict[str, str | None] = {}
    for dep in deployments:
        labels = (dep.get("metadata") or {}).get("labels") or {}
        rev = labels.get(LABEL_REVISION)
        if rev:
            observations[rev] = obs = observe_revision(dep, pods_by_rev.get(rev, []))
            engines[rev] = labels.get(LABEL_ENGINE)
            if obs.failure is None and obs.ready_replicas < obs.replicas:
                # A pod that will never be ready says why on /readyz (the lineage guarantee:
                # an adapter with another digest); the kubelet's probe keeps only the code.
                found = await scraping.readiness_failure(_session(), pods_by_rev.get(rev, []))
                if found:
                    observations[rev] = dataclasses.replace(
                        obs, failure=found[1], failure_reason=found[0]
                    )

    # Metrics only while a canary runs (nothing to compare otherwise), for stable and canary.
    status = md.get("status") or {}
    canary = (status.get("canary") or {}).get("name")
    stable = (status.get("stable") or {}).get("name")
    interval_metrics = None
    if canary:
        analysis = spec.rollout.analysis
        if not an.uses_counters(analysis):
            # Custom Prometheus query templates: interval figures, judged as returned.
            interval_metrics = {}
            for rev in (canary, stable):
                if not rev:
                    continue
                try:
                    interval_metrics[rev] = await scraping.query_prometheus(
                        _session(),
                        analysis.prometheus,
                        ns,
                        rev,
                        analysis.interval,
                        engines.get(rev),
                    )
                except (
                    aiohttp.ClientError,
                    TimeoutError,
                    RuntimeError,
                    ValueError,
                    KeyError,
                ) as exc:
                    log.warning(
                        "Prometheus query for %s/%s revision %s failed: %s", ns, name, rev, exc
                    )
        else:
            # Cumulative counters: from the pods' /metrics, or the same sums from Prometheus.
            for rev in (canary, stable):
                if rev and rev in observations:
                    if analysis.provider == "prometheus" and analysis.prometheus is not None:
                        counters, error = await scraping.prometheus_counters(
                            _session(), analysis.prometheus, ns, rev, engines.get(rev)
                        )
                    else:
                        counters, error = await scraping.scrape_revision(
                            _session(), pods_by_rev.get(rev, [])
                        )
                    observations[rev] = _with_counters(observations[rev], counters, error)

    eval_gate = None
    due = machine.eval_gate_due(md)
    if due is not None:
        api_key, key_error = await read_api_key(client, ns, spec)
        eval_gate = await scraping.run_eval_gate(
            _session(),
            md,
            due,
            lambda rev: scraping.ready_urls(pods_by_rev.get(rev, [])),
            api_key,
            key_error,
        )

    gateway = (
        await gateway_api_available(client)
        if spec.traffic.mode != "replicas" and spec.traffic.parent_refs
        else False
    )
    mode = weights.resolve_mode(spec.traffic.mode, gateway, bool(spec.traffic.parent_refs))
    traffic_problem = None
    if mode == weights.GATEWAY_API and not gateway:
        traffic_problem = (
            "traffic.mode is gatewayAPI but the cluster serves no HTTPRoute "
            f"({GATEWAY_GROUP_VERSION}): install the Gateway API CRDs or set traffic.mode auto"
        )
    return machine.Observed(
        model=model,
        revisions=observations,
        mode=mode,
        interval_metrics=interval_metrics,
        eval_gate=eval_gate,
        traffic_problem=traffic_problem,
    )


def _with_counters(
    obs: machine.RevisionObservation, counters: Any, error: str | None
) -> machine.RevisionObservation:
    from dataclasses import replace

    return replace(obs, counters=counters, scrape_error=error)


# --- acting ------------------------------------------------------------------------------


async def ensure_revision(
    client: KubeClient,
    md: Mapping[str, Any],
    action: machine.EnsureRevision,
    defaults: PodDefaults | None = None,
) -> None:
    """Create the revision's Deployment/Service/PDB, or scale and relabel an existing one."""
    ns = md["metadata"]["namespace"]
    dep_name = resource_name(md["metadata"]["name"], action.revision)
    current = await client.get("apps/v1", "Deployment", ns, dep_name)
    if current is None:
        if action.replicas == 0:
            return  # nothing to scale down
        source = action.source
        if source is None:
            log.warning("cannot create Deployment %s/%s: no revision source", ns, dep_name)
            return
        dep = builders.build_server_deployment(
            md, source, role=action.role, replicas=action.replicas, defaults=defaults
        )
        # Service and PDB first: an existing Deployment then implies they exist too, so a crash
        # between the creates never leaves a revision without its Service.
        await client.apply(builders.build_revision_service(md, action.revision))
        await client.apply(builders.build_pdb(md, action.revision))
        await client.create(dep)
        return
    patch: dict[str, Any] = {}
    if int((current.get("spec") or {}).get("replicas") or 0) != action.replicas:
        patch["spec"] = {"replicas": action.replicas}
    if ((current.get("metadata") or {}).get("labels") or {}).get(
        builders.LABEL_ROLE
    ) != action.role:
        patch["metadata"] = {"labels": {builders.LABEL_ROLE: action.role}}
    if patch:
        await client.patch("apps/v1", "Deployment", ns, dep_name, patch)


async def set_weights(
    client: KubeClient, md: Mapping[str, Any], action: machine.SetWeights, mode: str
) -> None:
    """The shared Service always; the HTTPRoute's weighted backendRefs in gatewayAPI mode."""
    await client.apply(builders.build_stable_service(md))
    if mode == weights.GATEWAY_API:
        await client.apply(builders.build_httproute(md, action.weights))


async def delete_revision(
    client: KubeClient, md: Mapping[str, Any], action: machine.DeleteRevision
) -> None:
    """Remove a revision's Deployment, Service and PDB (its weight is 0 already)."""
    ns = md["metadata"]["namespace"]
    name = resource_name(md["metadata"]["name"], action.revision)
    await client.delete("apps/v1", "Deployment", ns, name)
    await client.delete("v1", "Service", ns, name)
    await client.delete("policy/v1", "PodDisruptionBudget", ns, name)


async def execute(
    client: KubeClient,
    md: Mapping[str, Any],
    decided: machine.Step,
    mode: str,
    defaults: PodDefaults | None = None,
) -> float | None:
    """Carry out the actions in order; returns the requeue delay (None: none asked)."""
    requeue: float | None = None
    for action in events_first(decided.actions):
        if isinstance(action, machine.EnsureRevision):
            await ensure_revision(client, md, action, defaults)
        elif isinstance(action, machine.SetWeights):
            await set_weights(client, md, action, mode)
        elif isinstance(action, machine.DeleteRevision):
            await delete_revision(client, md, action)
        elif isinstance(action, machine.Event):
            await client.post_event(md, action.type, action.reason, action.message)
        elif isinstance(action, machine.RemoveAnnotation):
            meta = md["metadata"]
            await client.patch(
                API_VERSION,
                KIND,
                meta["namespace"],
                meta["name"],
                {"metadata": {"annotations": {action.key: None}}},
            )
        elif isinstance(action, machine.Requeue):
            requeue = action.seconds
    return requeue


async def reconcile(
    client: KubeClient, namespace: str, name: str, defaults: PodDefaults | None = None
) -> float | None:
    """One level-triggered reconcile of a ModelDeployment (see the module docstring).

    ``defaults`` are the cluster's pod defaults (chart values, kubetune.api.defaults).
    """
    md = await client.get(API_VERSION, KIND, namespace, name)
    if md is None or (md.get("metadata") or {}).get("deletionTimestamp"):
        return None
    observed = await observe(client, md, defaults)
    decided = machine.step(md, observed, datetime.datetime.now(datetime.UTC))
    # Record, then act: a crash after the patch finds the decision in status and re-derives
    # the actions from it; acting first could, for instance, remove an abort annotation and
    # die before the rollback is recorded, and the next step would route to the canary again.
    await client.patch_status(API_VERSION, KIND, namespace, name, md.get("status"), decided.status)
    return await execute(client, md, decided, observed.mode, defaults)
