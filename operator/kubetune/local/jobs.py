"""FineTuneJobs in the local runtime: the kubelet and the Job controller, played by processes.

The decisions are the operator's: every tick this driver hands the FineTuneJob and what it
observed of its two Jobs to ``kubetune.finetune.reconcile.plan`` -- the very function the Kopf
handlers call -- and carries out the actions it returns. What is local is only the part a
cluster would do on its own:

- ``CreateJob(manifest)``: the manifest comes from ``kubetune.finetune.builders``; its one
  container runs as a local process group (``containers.to_process``), with the progress
  channel pointed at a file (``KUBETUNE_REPORT=file://...``) and the termination log at another.
- The Job and its pod are then *observed* in the shape the API server would return them
  (``status.active/succeeded/failed``, ``containerStatuses[].state.terminated`` with the exit
  code and the termination message), and ``observe_job`` reduces them exactly as it does in a
  cluster. A process killed by signal N reads as exit code 128+N, as the kubelet reports it.
- The trainer's progress fragment (the file) is merged into ``status`` the way its status
  patches would be in a cluster: the trainer owns ``progress``, ``metrics``, ``checkpoints``
  and ``resumedFromStep``; the operator owns the rest.

Two local-only behaviours (docs/local.md): a controller that restarts finds no Job (its
processes died with the old controller), so ``plan`` sees the Job gone and starts a new attempt
that resumes from the last checkpoint -- what a cluster does when a Job is deleted under a
running FineTuneJob. And a finished FineTuneJob whose spec changed (a new generation) is
re-run from scratch: in a cluster the immutable fields force a new object, locally the same
name is convenient, and an unchanged spec is never re-run (its artifact is reused).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune.api.actions import events_first
from kubetune.api.common import LABEL_COMPONENT, LABEL_OWNER
from kubetune.api.times import now_rfc3339
from kubetune.local.containers import to_process
from kubetune.local.processes import ManagedProcess, Supervisor
from kubetune.local.store import Store

KIND = "FineTuneJob"

# Status fields the trainer owns (DESIGN.md, progress channel); everything else is the operator's.
TRAINER_FIELDS = ("progress", "metrics", "checkpoints", "resumedFromStep")
TERMINAL_PHASES = ("Succeeded", "Failed")

# Seconds a stopping trainer gets to write its SIGTERM checkpoint (terminationGracePeriodSeconds).
DEFAULT_GRACE_SECONDS = 30.0


def kubelet_exit_code(returncode: int | None) -> int | None:
    """Exit code as the kubelet reports it: a process killed by signal N exits 128+N."""
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


UNEXPLAINED_SIGKILL = "killed by SIGKILL (not by kubetune; out of memory is one possible cause)"


def oom_kills() -> int | None:
    """The kernel's count of OOM kills since boot (``/proc/vmstat`` oom_kill); None if unknown."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def terminated_reason(
    exit_code: int, killed_by_us: bool, oom_before: int | None = None, oom_after: int | None = None
) -> tuple[str, str | None]:
    """``(reason, message)`` of a terminated container, saying only what is known.

    A SIGKILL kubetune did not send is ``OOMKilled`` only when the kernel's OOM record confirms
    it: its oom_kill counter rose while the process lived. Otherwise it is an ``Error`` whose
    message says what happened and that memory is one possible cause (a user's ``kill -9``, a
    supervisor or a sandbox are others).
    """
    if exit_code == 0:
        return "Completed", None
    if exit_code == 128 + signal.SIGKILL and not killed_by_us:
        if oom_before is not None and oom_after is not None and oom_after > oom_before:
            return (
                "OOMKilled",
                f"killed by SIGKILL; the kernel's OOM killer ran while it lived "
                f"(/proc/vmstat oom_kill +{oom_after - oom_before})",
            )
        return "Error", UNEXPLAINED_SIGKILL
    return "Error", None


@dataclass
class LocalJob:
    """One Job the driver created: its manifest, its process and what a cluster would show."""

    manifest: dict[str, Any]
    process_name: str
    run_dir: Path
    created_at: str
    start_time: str | None = None
    completion_time: str | None = None
    deleted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The Job's name (``<ftj>-validate`` or ``<ftj>-train``)."""
        return str(self.manifest["metadata"]["name"])

    @property
    def report_path(self) -> Path:
        """The trainer's progress fragment (``KUBETUNE_REPORT=file://...``)."""
        return self.run_dir / "report.json"

    @property
    def termination_log(self) -> Path:
        """The container's termination message (``/dev/termination-log`` in a pod)."""
        return self.run_dir / "termination-log"


class JobDriver:
    """Reconciles FineTuneJobs with ``kubetune.finetune.reconcile.plan`` and local processes."""

    kind = KIND

    def __init__(
        self,
        store: Store,
        supervisor: Supervisor,
        on_event: Callable[[str, str, str, str, str], None] | None = None,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
    ) -> None:
        self.store = store
        self.supervisor = supervisor
        self.on_event = on_event
        self.grace_seconds = grace_seconds
        # Job name -> the Job as the local "API server" knows it.
        self.jobs: dict[str, LocalJob] = {}

    # --- the Driver protocol ----------------------------------------------------------------

    async def reconcile(self, obj: dict[str, Any]) -> None:
        """One level-triggered pass: observe both Jobs, ask ``plan``, write status once, then act."""
        from kubetune.finetune.reconcile import observe_job, plan

        name = obj["metadata"]["name"]
        obj = await self._restart_if_spec_changed(obj)
        status = dict(obj.get("status") or {})
        # The trainer's own patches land first, as they would on the API server.
        status.update(self._trainer_fragment(name))
        current = {**obj, "status": status}

        validate = observe_job(*self._observed(f"{name}-validate"))
        train = observe_job(*self._observed(f"{name}-train"))
        report = (self.store.run_dir(f"job/{name}-train") / "report.json").as_uri()
        decided = plan(current, validate, train, datetime.now(UTC), report=report)

        new_status = dict(decided.status)
        # plan() carries the trainer's fields through; re-apply the freshest fragment anyway so
        # a plan that rebuilt the status from scratch never hides a progress report.
        new_status.update(self._trainer_fragment(name))
        # Record, then act, as the operator does (docs/contracts.md, "Record, then act"): a
        # crash in between leaves a status the next plan reads back, e.g. a restart counted.
        self.store.write_status(KIND, name, new_status)
        for action in events_first(decided.actions):
            await self._act(current, action)

    def settled(self, obj: dict[str, Any]) -> bool:
        """A FineTuneJob is settled once Succeeded or Failed for its current generation."""
        status = obj.get("status") or {}
        generation = obj.get("metadata", {}).get("generation")
        if status.get("phase") not in TERMINAL_PHASES:
            return False
        if status.get("observedGeneration") not in (None, generation):
            return False
        return not any(self._running(job) for job in self._jobs_of(obj["metadata"]["name"]))

    async def forget(self, name: str) -> None:
        """The FineTuneJob was deleted: its Jobs go too (ownerReferences + garbage collection)."""
        for job in self._jobs_of(name):
            await self._delete_job(job.name, "owner deleted")

    async def shutdown(self) -> None:
        """The supervisor stops the processes (trainers checkpoint on SIGTERM); nothing else to do."""

    # --- observing --------------------------------------------------------------------------

    def _jobs_of(self, ftj_name: str) -> list[LocalJob]:
        return [
            j
            for j in self.jobs.values()
            if (j.manifest["metadata"].get("labels") or {}).get(LABEL_OWNER) == ftj_name
        ]

    def _running(self, job: LocalJob) -> bool:
        managed = self.supervisor.get(job.process_name)
        return managed is not None and managed.running

    def _trainer_fragment(self, ftj_name: str) -> dict[str, Any]:
        """The trainer-owned status fields from the newest progress file of the FineTuneJob."""
        fragment: dict[str, Any] = {}
        # Validate first, train second: the train Job's report wins where both wrote a field.
        for suffix in ("validate", "train"):
            job = self.jobs.get(f"{ftj_name}-{suffix}")
            if job is None:
                continue
            try:
                data = json.loads(job.report_path.read_text())
            except (OSError, ValueError):
                continue
            fragment.update(
                {k: v for k, v in data.items() if k in TRAINER_FIELDS and v is not None}
            )
        return fragment

    def _observed(self, job_name: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The Job and its pods as ``kubectl get job,pod -o json`` would show them."""
        job = self.jobs.get(job_name)
        if job is None or job.deleted:
            return None, []
        managed = self.supervisor.get(job.process_name)
        manifest = job.manifest
        pod_name = f"{job.name}-local"
        labels = dict(
            ((manifest.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels")
            or {}
        )
        pod: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": manifest["metadata"].get("namespace", "default"),
                "labels": labels,
            },
            "status": {},
        }
        job_status: dict[str, Any] = {}
        if managed is None:
            # Created, process not started yet: a pending pod.
            pod["status"] = {"phase": "Pending"}
            job_status = {"active": 1}
        elif managed.running:
            job_status = {"active": 1, "ready": 1, "startTime": job.start_time}
            pod["status"] = {
                "phase": "Running",
                "startTime": job.start_time,
                "containerStatuses": [
                    {
                        "name": _container_name(manifest),
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": job.start_time}},
                    }
                ],
            }
        else:
            exit_code = kubelet_exit_code(managed.returncode) or 0
            if job.completion_time is None:
                job.completion_time = now_rfc3339()
            if "oomKillsAtExit" not in job.extra:
                # Read once, when the exit is first seen: later kills are not this process's.
                job.extra["oomKillsAtExit"] = oom_kills()
            reason, why = terminated_reason(
                exit_code,
                managed.stopping,
                job.extra.get("oomKillsAtStart"),
                job.extra.get("oomKillsAtExit"),
            )
            terminated = {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": job.start_time,
                "finishedAt": job.completion_time,
            }
            message = _read_text(job.termination_log) or why
            if message:
                terminated["message"] = message
            succeeded = exit_code == 0
            pod["status"] = {
                "phase": "Succeeded" if succeeded else "Failed",
                "startTime": job.start_time,
                "containerStatuses": [
                    {
                        "name": _container_name(manifest),
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            }
            condition = {
                "type": "Complete" if succeeded else "Failed",
                "status": "True",
                "reason": "" if succeeded else "BackoffLimitExceeded",
                "message": "" if succeeded else "Job has reached the specified backoff limit",
                "lastTransitionTime": job.completion_time,
            }
            job_status = {
                "startTime": job.start_time,
                "conditions": [condition],
                ("succeeded" if succeeded else "failed"): 1,
            }
            if succeeded:
                job_status["completionTime"] = job.completion_time
        observed_job = {**manifest, "status": job_status}
        return observed_job, [pod]

    # --- acting -----------------------------------------------------------------------------

    async def _act(self, ftj: dict[str, Any], action: Any) -> None:
        from kubetune.api.actions import Event, Requeue
        from kubetune.finetune.reconcile import CreateJob, DeleteFineTuneJob, DeleteJob

        match action:
            case CreateJob():
                await self._create_job(ftj, action.manifest)
            case DeleteJob():
                await self._delete_job(action.name, action.reason)
            case Event():
                self._event(ftj, action)
            case DeleteFineTuneJob():
                # ttlSecondsAfterFinished elapsed: the object goes, its artifact stays.
                self.store.delete(KIND, ftj["metadata"]["name"])
                await self.forget(ftj["metadata"]["name"])
            case Requeue():
                pass  # the runtime reconciles every tick anyway
            case _:
                raise TypeError(f"FineTuneJob action {action!r} has no local executor")

    async def _create_job(self, ftj: dict[str, Any], manifest: dict[str, Any]) -> None:
        """Create a Job (idempotent, like a 409 on create) and start its container as a process."""
        name = manifest["metadata"]["name"]
        existing = self.jobs.get(name)
        if existing is not None and not existing.deleted:
            return
        if existing is not None:
            await self._delete_job(name, "replaced")
        self.store.save_child(manifest)
        process_name = f"job/{name}"
        run_dir = self.store.run_dir(process_name)
        job = LocalJob(
            manifest=manifest, process_name=process_name, run_dir=run_dir, created_at=now_rfc3339()
        )
        # A new attempt starts with a clean slate (a fresh pod): no stale report or message.
        for stale in (job.report_path, job.termination_log):
            stale.unlink(missing_ok=True)
        self.supervisor.forget(process_name)
        self.jobs[name] = job
        spec = to_process(
            manifest,
            process_name,
            run_dir,
            self.store.cache_dir,
            self.store.secret_value,
            overrides={
                "KUBETUNE_REPORT": job.report_path.as_uri(),
                "KUBETUNE_TERMINATION_LOG": str(job.termination_log),
            },
        )
        job.start_time = now_rfc3339()
        job.extra["oomKillsAtStart"] = oom_kills()
        managed: ManagedProcess = await self.supervisor.start(spec)
        job.extra["pid"] = managed.pid

    async def _delete_job(self, name: str, reason: str) -> None:
        """Delete a Job: its pod gets SIGTERM and the grace period (the trainer checkpoints)."""
        job = self.jobs.get(name)
        if job is None:
            return
        managed = self.supervisor.get(job.process_name)
        if managed is not None and managed.running:
            await self.supervisor.stop(job.process_name, grace_seconds=self.grace_seconds)
        self.supervisor.forget(job.process_name)
        del self.jobs[name]

    def _event(self, ftj: dict[str, Any], action: Any) -> None:
        self.store.record_event(ftj, action.type, action.reason, action.message)
        if self.on_event is not None:
            self.on_event(KIND, ftj["metadata"]["name"], action.type, action.reason, action.message)

    async def _restart_if_spec_changed(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A finished FineTuneJob with a new spec generation runs again (local convenience)."""
        status = obj.get("status") or {}
        generation = obj.get("metadata", {}).get("generation")
        observed = status.get("observedGeneration")
        if status.get("phase") not in TERMINAL_PHASES or observed is None or observed == generation:
            return obj
        name = obj["metadata"]["name"]
        for job in self._jobs_of(name):
            await self._delete_job(job.name, "spec changed")
        self.store.write_status(KIND, name, {})
        return {**obj, "status": {}}


def _container_name(manifest: dict[str, Any]) -> str:
    containers = manifest["spec"]["template"]["spec"].get("containers") or [{}]
    return str(containers[0].get("name", "main"))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")[:4096] or None
    except OSError:
        return None


def labels_of(manifest: dict[str, Any]) -> dict[str, str]:
    """The Job's labels (owner, component), for callers that list a FineTuneJob's children."""
    labels = manifest.get("metadata", {}).get("labels") or {}
    return {k: v for k, v in labels.items() if k in (LABEL_OWNER, LABEL_COMPONENT)}
