"""Pytest plugin: a Kubernetes API on loopback (kmock's emulator) and the real operator against it.

What it provides:

- ``kube_api`` (fixture): kmock's :class:`KubernetesEmulator` served over real HTTP on
  127.0.0.1, in its own thread and event loop (so a test, sync or async, can never stall the
  API server the operator talks to). The bundled built-in resources and the CRDs from ``crds/``
  are registered; ``KUBECONFIG`` points at it for the duration of the test (both Kopf and
  :mod:`kubetune.k8s.client` read it).
- ``kube`` (async fixture): a :class:`kubetune.k8s.client.KubeClient` bound to the test's loop.
- ``operator`` (fixture): the real operator, ``kopf run -m kubetune.handlers --standalone -A``
  under :class:`kopf.testing.KopfRunner`; ``start_operator(kube_api)`` for tests that restart
  it themselves.
- Helpers for tests to play the controllers Kubernetes would run (kmock runs none):
  :func:`finish_job`, :func:`fail_job`, :func:`set_pod_waiting`, :func:`set_pod_unschedulable`,
  and :func:`wait_for` (poll the API with a deadline; never a fixed sleep).
- A SESSION-LEVEL REQUEST LOG: every ``(method, path)`` any emulator served in the session is
  appended to :data:`REQUEST_LOG` and written at session end to
  ``.kubetune/test-artifacts/kmock-requests.json`` (the chart's RBAC-proof test reads it).

What the emulator adds to kmock (kmock stores plain JSON and nothing else), so the operator sees
an API server closer to a real one:

- on create: ``uid``, ``resourceVersion``, ``creationTimestamp``, ``generation: 1`` and the
  namespace from the URL;
- on update: a new ``resourceVersion``; ``generation`` + 1 when ``spec`` changes;
- ``/status`` isolation for resources with a status subresource: a patch to ``/status``
  changes only ``status``; a patch to the object itself never changes ``status``;
- garbage collection through ``ownerReferences`` (background propagation, transitively).

Still not emulated: validation/admission, label-selector filtering (the client re-filters),
optimistic concurrency, Job/Pod controllers (use the helpers above).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from kubetune.api.times import now_rfc3339
from kubetune.k8s.client import KubeClient
from tests.kubeconfig import write_kubeconfig

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
ARTIFACTS = REPO / ".kubetune" / "test-artifacts"
REQUEST_LOG_PATH = ARTIFACTS / "kmock-requests.json"

# Every (method, path) served by any emulator in this session (the RBAC-proof test reads it).
REQUEST_LOG: list[tuple[str, str]] = []
# The Kubernetes verb of each (method, path) as kmock parsed it (get/list/watch/create/...).
REQUEST_VERBS: dict[tuple[str, str], set[str]] = {}
_LOG_LOCK = threading.Lock()

_RV = itertools.count(2)
# The request being served by the current task (see KubetuneEmulator.__iter__).
_CURRENT_REQUEST: contextvars.ContextVar[Any] = contextvars.ContextVar("kubetune_kmock_request", default=None)  # resourceVersion '1' is what hand-made objects start with

FULL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


class KubetuneEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus uid/resourceVersion/generation, /status isolation, GC and a log."""

    def _has_status_subresource(self, resource: Any) -> bool:
        try:
            return "status" in self.resources[resource].subresources
        except Exception:  # noqa: BLE001 - unknown resource: behave like kmock
            return False

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        method = str(getattr(request.method, "value", request.method)).upper()
        entry = (method, request.url.path)
        verb = str(getattr(request.action, "value", request.action or "")).lower()
        with _LOG_LOCK:
            REQUEST_LOG.append(entry)
            REQUEST_VERBS.setdefault(entry, set()).add(verb)
        action = request.action
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            if action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                meta["uid"] = str(uuid.uuid4())
                meta["resourceVersion"] = str(next(_RV))
                meta["creationTimestamp"] = now_rfc3339()
                meta["generation"] = 1
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
                if meta.get("generateName") and not meta.get("name"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            elif action == kmock.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else None
                if self._has_status_subresource(request.resource):
                    if request.subresource == "status":
                        for k in [k for k in data if k not in ("status", "metadata")]:
                            del data[k]
                        data.pop("metadata", None)
                    else:
                        data.pop("status", None)
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = str(next(_RV))
                meta.pop("uid", None)
                if current is not None and "spec" in data and request.subresource is None:
                    merged = kmock.Object(current)
                    merged.patch({"spec": data["spec"]})
                    if merged.raw.get("spec") != current.get("spec"):
                        meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
        deleted_uid = None
        if action == kmock.action.DELETE and request.name is not None and request.resource is not None:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                deleted_uid = self.objects[key].raw.get("metadata", {}).get("uid")
        token = _CURRENT_REQUEST.set(request)
        try:
            response = await super()._handle(request)
        finally:
            _CURRENT_REQUEST.reset(token)
            self._trim_history()
        if deleted_uid:
            await self._collect_garbage({deleted_uid})
        return response

    # Speed: kmock keeps every request ever served and matches each new one against each of its
    # reactions by walking that whole history and evaluating the reaction's filters on every
    # entry until it meets the new request (quadratic in the number of requests, and in the
    # number of concurrent ones). The emulator's built-in reactions never look back, so while a
    # request is being matched the history it sees is that one request (a context variable: each
    # request is served in its own task), and the stored history is kept short.
    HISTORY_KEPT = 8

    def __iter__(self):  # type: ignore[override]
        current = _CURRENT_REQUEST.get()
        if current is not None:
            yield current
            return
        yield from super().__iter__()

    def _trim_history(self) -> None:
        keep = self.HISTORY_KEPT
        if len(self._requests) > 2 * keep:
            del self._requests[:-keep]
        for payload in self._payloads:
            seen = getattr(payload, "_requests", None)
            if isinstance(seen, list) and len(seen) > 2 * keep:
                del seen[:-keep]

    async def _collect_garbage(self, uids: set[str]) -> None:
        """Delete (transitively) every object owned by one of ``uids`` (background propagation)."""
        while uids:
            found: set[str] = set()
            async with self._lock:
                for (resource, _ns, _name), obj in list(self.objects.items()):
                    if obj.deleted:
                        continue
                    raw = obj.raw
                    owners = {ref.get("uid") for ref in raw.get("metadata", {}).get("ownerReferences") or []}
                    if owners & uids:
                        obj.delete()
                        found.add(raw.get("metadata", {}).get("uid"))
                        await self._buses[resource].put({"type": "DELETED", "object": raw})
            uids = found - {None}


class KubeApi:
    """The emulator running in a background thread; what tests need to reach it."""

    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self.url = ""
        self.kubeconfig = ""
        self.emulator: KubetuneEmulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self, kubeconfig_path: str | None = None) -> KubeApi:
        """Start the server thread; returns once the URL is known."""
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error:
            raise RuntimeError(f"kmock did not start: {self._error!r}")
        # The dummy token is no secret: the file stays readable (mode None) for the image tests.
        self.kubeconfig = str(
            write_kubeconfig(
                kubeconfig_path,
                self.url,
                token="kmock",
                user="kmock",
                namespace=self.namespace,
                mode=None,
            )
        )
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = KubetuneEmulator()
        emulator.resources.load_bundled()
        register_crds(emulator)
        async with emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        """Stop the server thread."""
        if self._loop and self._stop and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(10)
        with contextlib.suppress(OSError):
            os.unlink(self.kubeconfig)

    def client(self) -> KubeClient:
        """A new client for this server (bind it to one event loop; close it when done)."""
        return KubeClient(self.url)

    def objects(self, kind_plural: str) -> list[dict]:
        """Snapshot of the stored, not-deleted objects of a resource, e.g. ``'batch/v1/jobs'``."""
        assert self.emulator is not None and self._loop is not None

        async def snap() -> list[dict]:
            out = []
            for (resource, _ns, _name), obj in list(self.emulator.objects.items()):
                if not obj.deleted and f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/") == kind_plural.lstrip("/"):
                    out.append(json.loads(json.dumps(obj.raw)))
            return out

        return asyncio.run_coroutine_threadsafe(snap(), self._loop).result(10)

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request this session served so far (all emulators)."""
        with _LOG_LOCK:
            return list(REQUEST_LOG)


def register_crds(emulator: kmock.KubernetesEmulator, crd_dir: Path = CRD_DIR) -> None:
    """Make the emulator discover every CRD in ``crd_dir`` (kmock does not read CRD objects)."""
    for path in sorted(crd_dir.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            names = spec["names"]
            for version in spec["versions"]:
                emulator.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular"),
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    shortnames=names.get("shortNames", []),
                    categories=names.get("categories", []),
                    verbs=FULL_VERBS,
                    subresources=list((version.get("subresources") or {}).keys()),
                )
    # The built-in resources we rely on carry a status subresource in a real cluster too.
    for key in ("batch/v1/jobs", "v1/pods", "apps/v1/deployments"):
        info = emulator.resources[key]
        info.subresources.add("status")


@contextlib.contextmanager
def start_operator(api: KubeApi, *extra: str) -> Iterator[Any]:
    """Run the real operator (``kopf run -m kubetune.handlers``) against ``api`` until exit."""
    from kopf.testing import KopfRunner

    args = ["run", "-m", "kubetune.handlers", "--standalone", "--all-namespaces", *extra]
    with KopfRunner(args, timeout=30) as runner:
        yield runner


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture()
def kube_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[KubeApi]:
    """kmock's emulator over HTTP on loopback, with the CRDs; KUBECONFIG points at it."""
    api = KubeApi().start(str(tmp_path / "kubeconfig.yaml"))
    monkeypatch.setenv("KUBECONFIG", api.kubeconfig)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # NB: the kubernetes package (Kopf's login through it included) reads $KUBECONFIG once, at
    # import time; without this every test after the first would log in to a deleted file.
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", api.kubeconfig)
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture()
async def kube(kube_api: KubeApi):
    """An async API client in the test's event loop."""
    client = kube_api.client()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture()
def operator(kube_api: KubeApi) -> Iterator[Any]:
    """The real operator running against ``kube_api`` for the whole test."""
    with start_operator(kube_api) as runner:
        yield runner


# --- helpers: waiting -----------------------------------------------------------------------


async def wait_for(
    probe: Callable[[], Awaitable[Any]],
    timeout: float = 20.0,
    interval: float = 0.1,
    what: str = "condition",
) -> Any:
    """Poll ``probe()`` until it returns something truthy; fail with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(interval)


async def wait_for_object(
    client: KubeClient,
    api_version: str,
    kind: str,
    namespace: str,
    name: str,
    predicate: Callable[[dict], Any] = bool,
    timeout: float = 20.0,
) -> dict:
    """Poll one object until ``predicate(obj)`` holds; returns the object."""
    seen: dict[str, Any] = {}

    async def probe() -> Any:
        obj = await client.get(api_version, kind, namespace, name)
        seen["obj"] = obj
        return obj if obj is not None and predicate(obj) else None

    try:
        return await wait_for(probe, timeout=timeout, what=f"{kind} {namespace}/{name}")
    except AssertionError as exc:
        last = seen.get("obj")
        if isinstance(last, dict):  # what explains a miss: the status, not managedFields
            last = {"metadata": {k: v for k, v in last.get("metadata", {}).items() if k != "managedFields"}, "status": last.get("status")}
        raise AssertionError(f"{exc}\nlast object: {json.dumps(last, indent=1)[:6000]}") from None


def condition(obj: dict | None, type_: str) -> dict | None:
    """The condition of that type in ``obj.status.conditions`` (None when absent)."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


# --- helpers: playing the Job and Pod controllers ---------------------------------------------


async def _job_pod(
    client: KubeClient, job: dict, container_status: dict, phase: str, index: int = 0, pod_conditions: list | None = None
) -> dict:
    """Create (or update) the pod a Job controller would have made, with the given state."""
    meta = job["metadata"]
    name = f"{meta['name']}-{index}-{uuid.uuid4().hex[:5]}"
    template = job["spec"]["template"]
    labels = dict(template.get("metadata", {}).get("labels") or {})
    labels.update({"job-name": meta["name"], "batch.kubernetes.io/job-name": meta["name"], "controller-uid": meta["uid"]})
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"], "controller": True}
            ],
        },
        "spec": template["spec"],
    }
    created, _ = await client.create(pod)
    status = {"phase": phase, "containerStatuses": [container_status] if container_status else []}
    if pod_conditions:
        status["conditions"] = pod_conditions
    await client.patch("v1", "Pod", meta["namespace"], name, {"status": status}, subresource="status")
    return created


async def finish_job(
    client: KubeClient,
    namespace: str,
    name: str,
    *,
    succeeded: bool = True,
    message: dict | str | None = None,
    exit_code: int | None = None,
    reason: str | None = None,
) -> dict:
    """Play the Job controller: a pod terminated with ``message`` and the Job Complete/Failed.

    ``message`` is the container's termination message (a dict is JSON-encoded, as the trainer
    writes it). ``reason`` is the container's terminated reason (e.g. ``OOMKilled``).
    """
    job = await client.get("batch/v1", "Job", namespace, name)
    assert job is not None, f"Job {namespace}/{name} does not exist"
    text = json.dumps(message) if isinstance(message, dict) else (message or "")
    code = exit_code if exit_code is not None else (0 if succeeded else 1)
    terminated = {
        "exitCode": code,
        "reason": reason or ("Completed" if succeeded else "Error"),
        "message": text,
        "startedAt": now_rfc3339(),
        "finishedAt": now_rfc3339(),
    }
    await _job_pod(
        client,
        job,
        {"name": job["spec"]["template"]["spec"]["containers"][0]["name"], "ready": False, "restartCount": 0,
         "state": {"terminated": terminated}},
        "Succeeded" if succeeded else "Failed",
    )
    now = now_rfc3339()
    if succeeded:
        status = {
            "succeeded": 1,
            "active": 0,
            "startTime": now,
            "completionTime": now,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                {"type": "Complete", "status": "True", "lastTransitionTime": now},
            ],
        }
    else:
        status = {
            "failed": 1,
            "active": 0,
            "startTime": now,
            "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "lastTransitionTime": now},
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit", "lastTransitionTime": now},
            ],
        }
    patched = await client.patch("batch/v1", "Job", namespace, name, {"status": status}, subresource="status")
    assert patched is not None
    return patched


async def fail_job(client: KubeClient, namespace: str, name: str, **kwargs: Any) -> dict:
    """Play the Job controller: the Job Failed (see :func:`finish_job` for the arguments)."""
    return await finish_job(client, namespace, name, succeeded=False, **kwargs)


async def start_job(client: KubeClient, namespace: str, name: str) -> dict:
    """Play the Job controller: one pod running, ``status.active = 1``."""
    job = await client.get("batch/v1", "Job", namespace, name)
    assert job is not None, f"Job {namespace}/{name} does not exist"
    container = job["spec"]["template"]["spec"]["containers"][0]["name"]
    await _job_pod(client, job, {"name": container, "ready": True, "restartCount": 0,
                                 "state": {"running": {"startedAt": now_rfc3339()}}}, "Running")
    patched = await client.patch(
        "batch/v1", "Job", namespace, name, {"status": {"active": 1, "startTime": now_rfc3339()}}, subresource="status"
    )
    assert patched is not None
    return patched


async def set_pod_waiting(client: KubeClient, namespace: str, name: str, reason: str, message: str) -> dict:
    """Play the kubelet: the Job's pod is waiting (e.g. ``ImagePullBackOff``)."""
    job = await client.get("batch/v1", "Job", namespace, name)
    assert job is not None
    container = job["spec"]["template"]["spec"]["containers"][0]["name"]
    return await _job_pod(
        client, job,
        {"name": container, "ready": False, "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}},
        "Pending",
    )


async def set_pod_unschedulable(client: KubeClient, namespace: str, name: str, message: str) -> dict:
    """Play the scheduler: the Job's pod is Pending with PodScheduled=False/Unschedulable."""
    job = await client.get("batch/v1", "Job", namespace, name)
    assert job is not None
    return await _job_pod(
        client, job, {}, "Pending",
        pod_conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": message, "lastTransitionTime": now_rfc3339()}],
    )


# --- the session-level request log ------------------------------------------------------------


def _write_request_log() -> None:
    with _LOG_LOCK:
        entries = list(REQUEST_LOG)
        verbs = {k: sorted(v) for k, v in REQUEST_VERBS.items()}
    if not entries:
        return
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # Unique (method, path) pairs with counts: small, and what the RBAC proof needs.
    counts: dict[tuple[str, str], int] = {}
    for entry in entries:
        counts[entry] = counts.get(entry, 0) + 1
    doc = {
        "generated": now_rfc3339(),
        "total": len(entries),
        "requests": [
            {"method": m, "path": p, "verbs": verbs.get((m, p), []), "count": c}
            for (m, p), c in sorted(counts.items())
        ],
    }
    REQUEST_LOG_PATH.write_text(json.dumps(doc, indent=1))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the session's request log (hook of this plugin)."""
    _write_request_log()


atexit.register(_write_request_log)  # also when used outside pytest (the benchmark)
