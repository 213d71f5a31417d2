"""ModelDeployments in the local runtime: Deployments as server processes, a router as HTTPRoute.

As with FineTuneJobs (jobs.py), every decision is the operator's: each tick this driver
resolves the model source with ``kubetune.rollout.revisions.resolve``, gathers what a cluster
would let the operator observe, and hands it to ``kubetune.rollout.machine.step`` -- the same
canary state machine the Kopf handlers call. It then carries out the returned actions:

- ``EnsureRevision(revision, replicas)``: the Deployment comes from
  ``kubetune.rollout.builders.build_server_deployment``; each replica runs as a server process
  on a free loopback port (``KUBETUNE_PORT``). A replica that exits is restarted with an
  exponential back-off and its restarts are counted, like the kubelet's CrashLoopBackOff.
  Readiness is the container's readiness probe (``/readyz``), polled every tick.
- ``SetWeights(stable, canary)``: the local weighted router (router.py) gets one backend per
  *ready* replica (as an EndpointSlice lists only ready pods), weighted so that each revision
  gets its share whatever its replica count. The weights the router really holds are reported
  back on the next tick, so status shows the weights actually applied (DESIGN.md, Traffic).
- ``DeleteRevision(revision)``: the revision's processes get SIGTERM (the server drains).

Analysis figures come from scraping each replica's ``/metrics`` and summing them with
``kubetune.rollout.analysis`` -- the same code the operator uses on pod IPs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from kubetune.api.actions import events_first
from kubetune.local.containers import (
    ContainerError,
    container_port,
    free_port,
    main_container,
    pod_metadata_of,
    pod_spec_of,
    to_process,
)
from kubetune.local.jobs import kubelet_exit_code
from kubetune.local.processes import Supervisor
from kubetune.local.router import WeightedRouter
from kubetune.local.store import Store

KIND = "ModelDeployment"

# CrashLoopBackOff, compressed for a laptop: 1 s, 2 s, 4 s ... at most 20 s between restarts.
BACKOFF_START_SECONDS = 1.0
# Restarts after which a replica that is still not ready counts as crash-looping (a failure the
# state machine acts on: a canary is rolled back, a stable is Degraded).
CRASHLOOP_RESTARTS = 3
BACKOFF_MAX_SECONDS = 20.0
# A replica that stayed up this long has its back-off reset (the kubelet uses 10 minutes).
BACKOFF_RESET_SECONDS = 60.0
PROBE_TIMEOUT_SECONDS = 2.0
# Only when a Deployment's pod template has no terminationGracePeriodSeconds (the builders
# always set one, derived from requestTimeoutSeconds, so a draining server is never cut short).
SERVER_GRACE_SECONDS = 10.0


@dataclass
class Replica:
    """One server process (a pod of a revision's Deployment)."""

    index: int
    process_name: str
    port: int
    ready: bool = False
    #: The last /readyz answer while not ready (it may say why it never will be).
    unready_body: str | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    next_start_at: float = 0.0
    started_at: float = 0.0

    @property
    def url(self) -> str:
        """Base URL of the replica's HTTP server."""
        return f"http://127.0.0.1:{self.port}"


def grace_seconds(local: LocalRevision) -> float:
    """The revision's ``terminationGracePeriodSeconds``: what a kubelet gives a stopping pod."""
    spec = pod_spec_of(local.manifest)
    return float(spec.get("terminationGracePeriodSeconds", SERVER_GRACE_SECONDS))


@dataclass
class LocalRevision:
    """A revision's Deployment: its manifest and replica processes."""

    name: str
    manifest: dict[str, Any]
    replicas: list[Replica] = field(default_factory=list)
    desired: int = 0
    probe_path: str = "/readyz"

    @property
    def ready_replicas(self) -> list[Replica]:
        """Replicas whose readiness probe passes."""
        return [r for r in self.replicas if r.ready]


@dataclass
class MdepState:
    """Everything the driver keeps about one ModelDeployment."""

    router: WeightedRouter
    revisions: dict[str, LocalRevision] = field(default_factory=dict)
    # revision -> weight (percent) the state machine asked for, applied to ready replicas.
    weights: dict[str, int] = field(default_factory=dict)
    # revision -> its eval gate result (the golden prompts run once per canary revision).
    gate_results: dict[str, Any] = field(default_factory=dict)


class DeploymentDriver:
    """Reconciles ModelDeployments with ``kubetune.rollout.machine.step`` and local processes."""

    kind = KIND

    def __init__(
        self,
        store: Store,
        supervisor: Supervisor,
        router_host: str = "127.0.0.1",
        on_event: Callable[[str, str, str, str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.supervisor = supervisor
        self.router_host = router_host
        self.on_event = on_event
        self.states: dict[str, MdepState] = {}
        self._session: aiohttp.ClientSession | None = None

    # --- the Driver protocol ----------------------------------------------------------------

    async def reconcile(self, obj: dict[str, Any]) -> None:
        """Observe the revisions, ask the state machine, write status once, then act."""
        from kubetune.api.modeldeployment import ModelDeploymentSpec
        from kubetune.rollout import revisions
        from kubetune.rollout.builders import check_pod_template
        from kubetune.rollout.machine import step

        name = obj["metadata"]["name"]
        state = await self._state(name)
        spec = ModelDeploymentSpec.model_validate(obj["spec"])
        ftj = None
        if spec.model.fine_tune_job_ref is not None:
            ftj = self.store.get("FineTuneJob", spec.model.fine_tune_job_ref.name)
        resolved = check_pod_template(obj, revisions.resolve(spec, name, ftj))

        await self._tend_processes(state)
        await self._probe(state)
        self._apply_router(state)
        observed = await self._observe(obj, state, resolved)
        decided = step(obj, observed, datetime.now(UTC))
        # Record, then act, as the operator does (docs/contracts.md, "Record, then act"): the
        # next step reads back what this one decided (a rejection recorded, a retiring
        # revision's clock started) even if acting fails half-way.
        self.store.write_status(KIND, name, decided.status)
        for action in events_first(decided.actions):
            await self._act({**obj, "status": decided.status}, state, action)
        self._apply_router(state)

    def settled(self, obj: dict[str, Any]) -> bool:
        """Settled: Healthy, RolledBack, Degraded or ScaledToZero for the current generation, nothing retiring."""
        status = obj.get("status") or {}
        if status.get("phase") not in ("Healthy", "RolledBack", "Degraded", "ScaledToZero"):
            return False
        if status.get("observedGeneration") not in (None, obj["metadata"].get("generation")):
            return False
        if status.get("canary") or status.get("retiring"):
            return False
        # Every server process either ready or given up on (crash-looping). Otherwise a
        # controller restart, which has to start the servers again, would read the first
        # "0/1 ready" (Degraded) as the final word.
        state = self.states.get(obj["metadata"]["name"])
        for local in state.revisions.values() if state else []:
            for replica in local.replicas:
                if not replica.ready and replica.restarts < CRASHLOOP_RESTARTS:
                    return False
        return True

    async def forget(self, name: str) -> None:
        """The ModelDeployment was deleted: stop its servers and its router."""
        state = self.states.pop(name, None)
        if state is None:
            return
        for revision in list(state.revisions):
            await self._delete_revision(state, revision)
        await state.router.stop()
        self._write_endpoints()

    async def shutdown(self) -> None:
        """Stop every router (the supervisor stops the server processes)."""
        for name in list(self.states):
            state = self.states.pop(name)
            with contextlib.suppress(Exception):
                await state.router.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._write_endpoints()

    # --- state ------------------------------------------------------------------------------

    async def _state(self, name: str) -> MdepState:
        state = self.states.get(name)
        if state is None:
            # Keep the router's port across controller restarts when it is still free, so a
            # client configured with the endpoint keeps working.
            port = 0
            previous = _read_json(self.store.root / "endpoints.json").get(name)
            if previous:
                with contextlib.suppress(ValueError):
                    port = int(previous.rsplit(":", 1)[1])
            router = WeightedRouter(self.router_host, port)
            try:
                await router.start()
            except OSError:
                router = WeightedRouter(self.router_host, 0)
                await router.start()
            state = MdepState(router=router)
            self.states[name] = state
            self._write_endpoints()
        return state

    def _write_endpoints(self) -> None:
        path = self.store.root / "endpoints.json"
        data = {name: s.router.url for name, s in self.states.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".endpoints.json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

    def router_of(self, name: str) -> WeightedRouter | None:
        """The router of a ModelDeployment (the demo reads its counters)."""
        state = self.states.get(name)
        return state.router if state else None

    # --- processes (the kubelet + the Deployment controller) ---------------------------------

    async def _ensure_revision(
        self,
        obj: dict[str, Any],
        state: MdepState,
        source: Any,
        rev_name: str,
        replicas: int,
        role: str,
    ) -> None:
        """Run ``replicas`` server processes of a revision's Deployment (scale up or down)."""
        from kubetune.rollout.builders import build_server_deployment

        local = state.revisions.get(rev_name)
        if local is None:
            manifest = build_server_deployment(obj, source, role=role, replicas=replicas)
            self.store.save_child(manifest)
            container = main_container(manifest)
            probe = ((container.get("readinessProbe") or {}).get("httpGet") or {}).get(
                "path"
            ) or "/readyz"
            local = LocalRevision(name=rev_name, manifest=manifest, probe_path=probe)
            state.revisions[rev_name] = local
        local.desired = replicas
        # Scale down: the highest indexes go first, as a ReplicaSet removes the newest pods.
        while len(local.replicas) > replicas:
            replica = local.replicas.pop()
            await self.supervisor.stop(replica.process_name, grace_seconds=grace_seconds(local))
            self.supervisor.forget(replica.process_name)
        while len(local.replicas) < replicas:
            index = len(local.replicas)
            mdep = obj["metadata"]["name"]
            replica = Replica(
                index=index, process_name=f"server/{mdep}-{rev_name}-{index}", port=free_port()
            )
            local.replicas.append(replica)
            await self._start_replica(local, replica)

    def _termination_log(self, replica: Replica) -> Any:
        return self.store.run_dir(replica.process_name) / "termination-log"

    def _termination_message(self, replica: Replica) -> str | None:
        """The replica's last termination message (its start-up error), or None."""
        from kubetune.rollout.builders import termination_text

        current = self._termination_log(replica)
        for path in (current, current.with_name("termination-log.last")):
            try:
                text = termination_text(path.read_text(errors="replace"))
            except OSError:
                continue
            if text:
                return text
        return None

    async def _start_replica(self, local: LocalRevision, replica: Replica) -> None:
        manifest = local.manifest
        spec = to_process(
            manifest,
            replica.process_name,
            self.store.run_dir(replica.process_name),
            self.store.cache_dir,
            self.store.secret_value,
            overrides={
                "KUBETUNE_PORT": str(replica.port),
                "KUBETUNE_HOST": "127.0.0.1",
                # The pod's /dev/termination-log, per process as the kubelet keeps it per container.
                "KUBETUNE_TERMINATION_LOG": str(self._termination_log(replica)),
            },
        )
        # A fresh start has no termination message yet; the last one stays beside it as the
        # kubelet keeps lastState.terminated.message while the restarted container runs.
        current = self._termination_log(replica)
        if current.exists():
            current.replace(current.with_name("termination-log.last"))
        # The pod's own port is irrelevant locally; the probe follows KUBETUNE_PORT.
        _ = container_port(main_container(manifest))
        self.supervisor.forget(replica.process_name)
        replica.ready = False
        replica.started_at = time.monotonic()
        await self.supervisor.start(spec)

    async def _tend_processes(self, state: MdepState) -> None:
        """Restart replicas that exited (with back-off), as the kubelet restarts containers."""
        now = time.monotonic()
        for local in state.revisions.values():
            for replica in local.replicas:
                managed = self.supervisor.get(replica.process_name)
                if managed is not None and managed.running:
                    continue
                if managed is not None and replica.next_start_at == 0.0:
                    # Just noticed the exit: schedule the restart.
                    replica.ready = False
                    replica.last_exit_code = managed.returncode
                    uptime = (managed.finished_at or time.time()) - managed.started_at
                    if uptime > BACKOFF_RESET_SECONDS:
                        replica.restarts = 0
                    delay = min(
                        BACKOFF_MAX_SECONDS, BACKOFF_START_SECONDS * 2 ** min(replica.restarts, 10)
                    )
                    replica.next_start_at = now + delay
                    replica.restarts += 1
                    continue
                if now >= replica.next_start_at:
                    replica.next_start_at = 0.0
                    await self._start_replica(local, replica)

    async def _delete_revision(self, state: MdepState, rev_name: str) -> None:
        local = state.revisions.pop(rev_name, None)
        state.weights.pop(rev_name, None)
        if local is None:
            return
        await asyncio.gather(
            *(
                self.supervisor.stop(r.process_name, grace_seconds=grace_seconds(local))
                for r in local.replicas
            )
        )
        for replica in local.replicas:
            self.supervisor.forget(replica.process_name)

    # --- probing and scraping ----------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)
            )
        return self._session

    async def _probe(self, state: MdepState) -> None:
        """Run every replica's readiness probe (concurrently)."""
        replicas = [(local, r) for local in state.revisions.values() for r in local.replicas]

        async def one(local: LocalRevision, replica: Replica) -> None:
            managed = self.supervisor.get(replica.process_name)
            if managed is None or not managed.running:
                replica.ready = False
                return
            try:
                async with self._client().get(replica.url + local.probe_path) as response:
                    replica.ready = response.status == 200
                    replica.unready_body = None if replica.ready else await response.text()
            except (aiohttp.ClientError, TimeoutError, OSError):
                replica.ready = False

        await asyncio.gather(*(one(local, r) for local, r in replicas))

    async def scrape(self, state: MdepState, rev_name: str) -> Any:
        """Cumulative counters of a revision: every ready replica's /metrics, summed."""
        from kubetune.api.common import LABEL_ENGINE
        from kubetune.rollout.analysis import counters_from_text, sum_counters
        from kubetune.rollout.metricmaps import metric_map

        local = state.revisions.get(rev_name)
        if local is None:
            return None
        # The same map the operator picks: the engine label of the revision's pod template.
        metrics = metric_map(pod_metadata_of(local.manifest).get("labels", {}).get(LABEL_ENGINE))
        texts = []
        for replica in local.replicas:
            if not replica.ready:
                continue
            try:
                async with self._client().get(replica.url + "/metrics") as response:
                    if response.status == 200:
                        texts.append(await response.text())
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
        if not texts:
            return None
        return sum_counters(counters_from_text(t, metrics) for t in texts)

    # --- the router (HTTPRoute) ----------------------------------------------------------------

    def _apply_router(self, state: MdepState) -> None:
        """Give the router one backend per ready replica, each revision keeping its share."""
        table: dict[str, tuple[str, int]] = {}
        counts = [
            len(state.revisions[r].ready_replicas) for r in state.weights if r in state.revisions
        ]
        scale = math.lcm(*[c for c in counts if c]) if any(counts) else 1
        for rev_name, weight in state.weights.items():
            local = state.revisions.get(rev_name)
            if local is None:
                continue
            ready = local.ready_replicas
            for replica in ready:
                table[f"{rev_name}/{replica.index}"] = (replica.url, weight * scale // len(ready))
        if table != {n: (b.url, b.weight) for n, b in state.router.backends.items()}:
            state.router.set_backends(table)

    def applied_weights(self, state: MdepState) -> dict[str, int]:
        """Revision -> percent of traffic the router really sends (0 for a revision without ready pods)."""
        by_revision: dict[str, int] = {}
        for backend_name, backend in state.router.backends.items():
            rev = backend_name.split("/", 1)[0]
            by_revision[rev] = by_revision.get(rev, 0) + backend.weight
        total = sum(by_revision.values())
        if total <= 0:
            return {rev: 0 for rev in state.weights}
        return {rev: round(100 * by_revision.get(rev, 0) / total) for rev in state.weights}

    # --- observing / acting (glue to kubetune.rollout.machine) ---------------------------------

    async def _observe(self, obj: dict[str, Any], state: MdepState, resolved: Any) -> Any:
        """What the operator would observe: each revision's pods and counters, the router mode."""
        from kubetune.api.conditions import Reason
        from kubetune.rollout.builders import readiness_failure
        from kubetune.rollout.machine import Observed, RevisionObservation
        from kubetune.rollout.weights import LOCAL

        revisions: dict[str, RevisionObservation] = {}
        for rev_name, local in state.revisions.items():
            ready = len(local.ready_replicas)
            failure = failure_reason = None
            crashing = [
                r for r in local.replicas if r.restarts >= CRASHLOOP_RESTARTS and not r.ready
            ]
            if crashing:
                worst = max(crashing, key=lambda r: r.restarts)
                log = self.store.run_dir(worst.process_name) / "log.txt"
                why = self._termination_message(worst)
                failure = (
                    f"CrashLoopBackOff: server exited with code {kubelet_exit_code(worst.last_exit_code)} "
                    f"{worst.restarts} times: {why} (log: {log})"
                    if why
                    else f"CrashLoopBackOff: server exited with code {kubelet_exit_code(worst.last_exit_code)} "
                    f"{worst.restarts} times (log: {log}){_last_line(log)}"
                )
                failure_reason = Reason.CANARY_CRASHLOOP
            for replica in local.replicas:
                found = (
                    None if failure or replica.ready else readiness_failure(replica.unready_body)
                )
                if found:
                    failure_reason, failure = found[0], f"replica {replica.index}: {found[1]}"
            counters, scrape_error = None, None
            if ready:
                try:
                    counters = await self.scrape(state, rev_name)
                except ValueError as exc:  # a malformed exposition: an analysis Error, not a crash
                    scrape_error = str(exc)
            revisions[rev_name] = RevisionObservation(
                replicas=len(local.replicas),
                ready_replicas=ready,
                available=local.desired > 0 and ready >= local.desired,
                failure=failure,
                failure_reason=failure_reason,
                counters=counters,
                scrape_error=scrape_error,
            )
        return Observed(
            model=resolved,
            revisions=revisions,
            mode=LOCAL,
            eval_gate=await self._eval_gate(obj, state),
        )

    async def _eval_gate(self, obj: dict[str, Any], state: MdepState) -> Any:
        """Run the golden prompts when the state machine asks for them (``eval_gate_due``).

        The operator's own path (``kubetune.k8s.scraping.run_eval_gate``) against the ready
        replicas' ports; only finding the API key is local (:func:`api_key_of`).
        """
        from kubetune.api.modeldeployment import ModelDeploymentSpec
        from kubetune.k8s.scraping import run_eval_gate
        from kubetune.rollout.machine import eval_gate_due

        due = eval_gate_due(obj)
        if due is None:
            return None
        cached = state.gate_results.get(due[0])
        if cached is not None:
            return cached
        spec = ModelDeploymentSpec.model_validate(obj["spec"])
        api_key = key_error = None
        try:
            api_key = api_key_of(spec, self.store.secret_value)
        except ContainerError as exc:
            key_error = str(exc)

        def urls_of(revision: str) -> list[str]:
            local = state.revisions.get(revision)
            return [r.url for r in local.ready_replicas] if local else []

        result = await run_eval_gate(self._client(), obj, due, urls_of, api_key, key_error)
        if result.canary_score is not None:
            state.gate_results[due[0]] = result
        return result

    async def _act(self, obj: dict[str, Any], state: MdepState, action: Any) -> None:
        from kubetune.api.actions import Event, Requeue
        from kubetune.rollout.machine import (
            DeleteRevision,
            EnsureRevision,
            RemoveAnnotation,
            SetWeights,
            revision_from_status,
        )

        name = obj["metadata"]["name"]
        match action:
            case EnsureRevision():
                source = action.source
                if source is None:
                    # Recreate a lost Deployment from what status remembers of the revision.
                    status = obj.get("status") or {}
                    for role in ("stable", "canary"):
                        if (status.get(role) or {}).get("name") == action.revision:
                            source = revision_from_status(status[role], name)
                if source is None and action.revision not in state.revisions:
                    return
                await self._ensure_revision(
                    obj, state, source, action.revision, action.replicas, action.role
                )
            case SetWeights():
                state.weights = {str(k): int(v) for k, v in dict(action.weights).items()}
            case DeleteRevision():
                await self._delete_revision(state, action.revision)
            case RemoveAnnotation():
                # A one-shot annotation (promote, abort) was acted on, as `kubectl annotate key-`.
                self.store.patch_annotations(KIND, name, {action.key: None})
            case Event():
                self._event(obj, action)
            case Requeue():
                pass  # the runtime reconciles every tick anyway
            case _:
                raise TypeError(f"ModelDeployment action {action!r} has no local executor")

    def _event(self, obj: dict[str, Any], action: Any) -> None:
        self.store.record_event(obj, action.type, action.reason, action.message)
        if self.on_event is not None:
            self.on_event(KIND, obj["metadata"]["name"], action.type, action.reason, action.message)


def _last_line(log: Any) -> str:
    """``: <last line of the log>`` (the crash reason, usually), or nothing."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1][-300:]}" if lines else ""


def api_key_of(spec: Any, secret_lookup: Callable[[str, str], str | None]) -> str | None:
    """The serving pods' API key (``spec.server.apiKeySecret``) as their env resolves it.

    Found the way :func:`kubetune.local.containers.resolve_env` finds it for the server
    process (a locally applied Secret, else the variable named like the key), so the eval gate
    and ``kubetune local traffic`` send exactly the key the server expects. None without
    ``apiKeySecret``; ContainerError when it cannot be found.
    """
    ref = spec.server.api_key_secret
    if ref is None:
        return None
    import os

    value = secret_lookup(ref.name, ref.key)
    if value is None:
        value = os.environ.get(ref.key)
    if value is None:
        raise ContainerError(
            f"spec.server.apiKeySecret: key {ref.key!r} of Secret {ref.name!r} not found; "
            f"apply a Secret manifest with `kubetune local apply -f` or export {ref.key}"
        )
    return value.strip()


def _read_json(path: Any) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
