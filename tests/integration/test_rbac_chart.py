"""RBAC proof: the chart's Role rules allow every API call the real operator makes, and no more.

The operator (``kopf run`` with the exact arguments of the chart's Deployment) runs under
``KopfRunner`` against kmock's emulator, through an API endpoint of its own: the emulator
serves two ports, the operator's kubeconfig points at one and the test (playing the Job and
Deployment controllers) uses the other, so the log holds the operator's calls and nothing else.
Each call becomes an RBAC attribute ``(verb, apiGroup, resource[/subresource], namespace)``
exactly as the API server's authorizer derives it.

Covers:
- cluster-wide install (defaults): a FineTuneJob goes validate -> train -> Succeeded, a
  ModelDeployment serving it gets its first revision, a gatewayAPI one gets its route; every
  call is allowed by the rendered ClusterRole; every rule the chart grants is either used in
  that run or listed in ``NOT_EXERCISED`` with the reason (so unused grants cannot creep in);
- namespace-scoped install (``watchNamespaces``): every call stays inside the watched
  namespace and is allowed by that namespace's Role (no cluster-scoped call at all);
- Argo CD's health script on the statuses the operator really wrote (Healthy, Degraded after the
  abort, Progressing for a generation not yet observed);
- the peering object, Kopf's liveness endpoint (/healthz) the Deployment's probe uses, and the
  operator's /metrics (phase gauges fed by ``kubetune.startup``);
- docs/security.md documents exactly the rules the chart grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kmock
import pytest
import yaml

from kubetune import metrics
from kubetune.k8s.client import KubeClient
from tests.kubeconfig import write_kubeconfig
from tests.plugins.kube import (
    KubetuneEmulator,
    fail_job,
    finish_job,
    register_crds,
    wait_for,
    wait_for_object,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
API = "kubetune.io/v1alpha1"
RELEASE_NS = "kubetune-system"

helm.disable_logging()

# Grants that the scenario below does not exercise, each with the code path that needs it.
# Everything else the chart grants must show up in the operator's request log.
NOT_EXERCISED: dict[tuple[str, str, str], str] = {
    (
        "update",
        "kubetune.io",
        "finetunejobs/finalizers",
    ): "blockOwnerDeletion under OwnerReferencesPermissionEnforcement (not in kmock)",
    (
        "update",
        "kubetune.io",
        "modeldeployments/finalizers",
    ): "blockOwnerDeletion under OwnerReferencesPermissionEnforcement (not in kmock)",
    (
        "get",
        "kubetune.io",
        "finetunejobs/status",
    ): "held so the per-job trainer Role may grant it (RBAC escalation check)",
    (
        "delete",
        "kubetune.io",
        "finetunejobs",
    ): "ttlSecondsAfterFinished (exercised by the namespaced scenario below)",
    ("patch", "", "services"): "a changed traffic.port / revision Service is updated in place",
    (
        "patch",
        "",
        "serviceaccounts",
    ): "workload-identity annotations changed on the user's ServiceAccount",
    ("patch", "rbac.authorization.k8s.io", "roles"): "the trainer Role is re-applied if it drifted",
    (
        "patch",
        "rbac.authorization.k8s.io",
        "rolebindings",
    ): "the trainer RoleBinding is re-applied if it drifted",
    ("patch", "apps", "deployments"): "replicas change when the canary weight changes",
    (
        "get",
        "policy",
        "poddisruptionbudgets",
    ): "a create that meets 409 reads the existing PDB (operator restart mid-create)",
    ("patch", "policy", "poddisruptionbudgets"): "a revision's PDB follows replicas",
}


# --- the API server with a separate endpoint for the operator -----------------------------


class RecordingEmulator(KubetuneEmulator):
    """The harness's emulator that also records the calls arriving on the operator's port."""

    operator_port: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.operator_calls: list[tuple[str, str, str]] = []  # (method, path, query)
        self.calls_lock = threading.Lock()

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        if self.operator_port is not None and request.url.port == self.operator_port:
            method = str(getattr(request.method, "value", request.method)).upper()
            with self.calls_lock:
                self.operator_calls.append((method, request.url.path, request.url.query_string))
        return await super()._handle(request)


class TwoPortApi:
    """kmock's emulator in a thread, served on two ports: one for the operator, one for tests."""

    def __init__(self, kubeconfig_path: str) -> None:
        self.kubeconfig_path = kubeconfig_path
        self.emulator: RecordingEmulator | None = None
        self.test_url = ""
        self.operator_url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock-rbac", daemon=True)

    def __enter__(self) -> TwoPortApi:
        self._thread.start()
        assert self._ready.wait(30), "kmock did not start"
        write_kubeconfig(
            self.kubeconfig_path, self.operator_url, token="kmock", user="kmock", mode=None
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop and self._stop:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = RecordingEmulator()
        emulator.resources.load_bundled()
        register_crds(emulator)
        register_crds(emulator, CHART / "crds")  # Kopf's peering CRDs ship with the chart
        emulator.resources["gateway.networking.k8s.io/v1/httproutes"] = kmock.ResourceInfo(
            kind="HTTPRoute",
            singular="httproute",
            namespaced=True,
            verbs=["create", "delete", "get", "list", "patch", "update", "watch"],
        )
        async with emulator, kmock.Server(emulator) as tests, kmock.Server(emulator) as operator:
            emulator.operator_port = operator.port
            self.emulator = emulator
            self.test_url = str(tests.url).rstrip("/")
            self.operator_url = str(operator.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def operator_calls(self) -> list[tuple[str, str, str]]:
        assert self.emulator is not None
        with self.emulator.calls_lock:
            return list(self.emulator.operator_calls)


# --- RBAC attributes of a request, as the API server's authorizer derives them ------------

_DISCOVERY = re.compile(r"^/api(/v1)?/?$|^/apis(/[^/]+){0,2}/?$|^/(version|healthz|openapi/.*)$")


def attributes(method: str, path: str, query: str) -> tuple[str, str, str, str | None] | None:
    """(verb, apiGroup, resource[/subresource], namespace) of a resource request; None for discovery."""
    if _DISCOVERY.match(path):
        return None
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else None
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    watch = "watch=true" in query or "watch=1" in query
    verb = {
        ("GET", True): "get",
        ("GET", False): "watch" if watch else "list",
        ("POST", False): "create",
        ("PATCH", True): "patch",
        ("PUT", True): "update",
        ("DELETE", True): "delete",
        ("DELETE", False): "deletecollection",
    }[(method, name is not None)]
    if resource == "namespaces" and name is not None and namespace is None:
        namespace = name
    return verb, group, resource, namespace


def allows(rules: list[dict[str, Any]], verb: str, group: str, resource: str) -> bool:
    return any(
        verb in rule["verbs"]
        and group in rule["apiGroups"]
        and resource in rule["resources"]
        and not rule.get("resourceNames")
        for rule in rules
    )


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (v, g, r)
        for rule in rules
        for v in rule["verbs"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }


def render_chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = helm.Chart.load(CHART).render(
        values, name="kubetune", namespace=RELEASE_NS, is_install=True
    )
    return [
        d
        for path, text in manifests.items()
        if not path.endswith(".txt")
        for d in yaml.safe_load_all(text)
        if d
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def chart_operator(
    api: TwoPortApi,
    objects: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    pod_id: str = "kubetune-0",
) -> Iterator[int]:
    """The operator with the chart Deployment's arguments and environment; yields its liveness port."""
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    args = []
    for arg in container["args"][1:]:  # without "run": start_operator adds it
        if arg.startswith("--liveness="):
            arg = re.sub(r"0\.0\.0\.0:\d+", f"127.0.0.1:{port}", arg)
        args.append(arg)
    for env in container["env"]:
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
    monkeypatch.setenv("POD_ID", pod_id)  # Kopf's peer identity (the pod name in a cluster)
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    monkeypatch.setenv("KUBETUNE_METRICS_ADDR", "127.0.0.1")
    monkeypatch.setenv("KUBECONFIG", api.kubeconfig_path)
    # Kopf logs in through the kubernetes package, which read $KUBECONFIG once, at import.
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", api.kubeconfig_path
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    from kopf.testing import KopfRunner

    with KopfRunner(["run", *args], timeout=60) as runner:
        yield port
    assert runner.exception is None or isinstance(runner.exception, SystemExit), runner.exception


def kopf_peering_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["apiVersion"].startswith("kopf.dev/")]


async def scraped_phase_count(kind: str, phase: str, at_least: int = 1) -> float | None:
    """The operator's /metrics (over HTTP) count of ``kind`` in ``phase``, once it reaches ``at_least``."""
    port = metrics.serve(0)  # already started by kubetune.startup: returns its port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    name = {"FineTuneJob": "kubetune_finetunejobs", "ModelDeployment": "kubetune_modeldeployments"}[
        kind
    ]
    match = re.search(rf'^{name}{{phase="{phase}"}} ([0-9.]+)$', text, flags=re.M)
    value = float(match.group(1)) if match else 0.0
    return value if value >= at_least else None


def argocd_health(obj: dict[str, Any] | None) -> str:
    """argocd/health.lua's verdict on ``obj``, run as Argo CD runs it (Lua 5.1, global ``obj``)."""
    from lupa import lua51

    assert obj is not None
    lua = lua51.LuaRuntime()

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items() if v is not None})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(obj)
    return lua.execute((REPO / "argocd" / "health.lua").read_text())["status"]


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as rsp:
        return rsp.status


# --- scenarios --------------------------------------------------------------------------------

DATA_OK = {
    "outcome": "succeeded",
    "message": "data valid",
    "dataReport": {"format": "chat", "valid": 20, "invalid": 0},
}
ARTIFACT = {
    "uri": "s3://out/rbac/model/",
    "digest": "sha256:feed",
    "lineageUri": "s3://out/rbac/model/lineage.json",
}


def finetunejob(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": f"s3://out/{name}"},
            "storage": {"serviceAccountName": "s3-identity"},
            "resources": {"gpus": 1},
            "retry": {"maxRestarts": 2, "backoffSeconds": 0},
        },
    }


def modeldeployment(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": 1, **spec},
    }


def phase(value: str):
    return lambda obj: (obj.get("status") or {}).get("phase") == value


async def train_to_success(
    kube: KubeClient,
    namespace: str,
    name: str,
    preempt_first: bool = False,
    then_deleted: bool = False,
) -> None:
    """Play the Job controller through one FineTuneJob's validate and train Jobs.

    With ``preempt_first`` the first train attempt is preempted (exit 143 after its SIGTERM
    checkpoint), so the operator deletes that Job and creates the next attempt. With
    ``then_deleted`` the job has ``ttlSecondsAfterFinished: 0``: the operator deletes it.
    """
    await wait_for_object(kube, "batch/v1", "Job", namespace, f"{name}-validate", timeout=30)
    await finish_job(kube, namespace, f"{name}-validate", message=DATA_OK)
    train = await wait_for_object(kube, "batch/v1", "Job", namespace, f"{name}-train", timeout=30)
    if preempt_first:
        preempted = {
            "outcome": "preempted",
            "message": "preempted; checkpoint step-5 saved",
            "step": 5,
        }
        await fail_job(kube, namespace, f"{name}-train", exit_code=143, message=preempted)
        first_uid = train["metadata"]["uid"]
        await wait_for_object(
            kube,
            "batch/v1",
            "Job",
            namespace,
            f"{name}-train",
            lambda j: j["metadata"]["uid"] != first_uid,
            timeout=30,
        )
    done = {"outcome": "succeeded", "message": "done", "step": 10, "artifact": ARTIFACT}
    await finish_job(kube, namespace, f"{name}-train", message=done)
    if then_deleted:

        async def gone() -> bool:
            return await kube.get(API, "FineTuneJob", namespace, name) is None

        await wait_for(gone, timeout=30, what=f"FineTuneJob {name} deleted after its TTL")
    else:
        await wait_for_object(
            kube, API, "FineTuneJob", namespace, name, phase("Succeeded"), timeout=30
        )


@contextlib.asynccontextmanager
async def deployment_controller(kube: KubeClient, namespace: str):
    """Play the Deployment controller in the background: every kubetune Deployment becomes ready."""

    async def loop() -> None:
        while True:
            for dep in await kube.list("apps/v1", "Deployment", namespace):
                labels = dep["metadata"].get("labels") or {}
                replicas = dep["spec"].get("replicas", 1)
                status = dep.get("status") or {}
                generation = dep["metadata"].get("generation", 1)
                if labels.get("kubetune.io/kind") != "ModelDeployment":
                    continue
                if (
                    status.get("readyReplicas") == replicas
                    and status.get("observedGeneration") == generation
                ):
                    continue
                ready = {
                    "replicas": replicas,
                    "readyReplicas": replicas,
                    "availableReplicas": replicas,
                }
                ready |= {"updatedReplicas": replicas, "observedGeneration": generation}
                await kube.patch(
                    "apps/v1",
                    "Deployment",
                    namespace,
                    dep["metadata"]["name"],
                    {"status": ready},
                    subresource="status",
                )
            await asyncio.sleep(0.1)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def mdep_where(
    kube: KubeClient, namespace: str, name: str, predicate, what: str
) -> dict[str, Any]:
    return await wait_for_object(
        kube, API, "ModelDeployment", namespace, name, predicate, timeout=30
    )


def stable_is_not(revision: str | None):
    def check(obj: dict[str, Any]) -> bool:
        status = obj.get("status") or {}
        return status.get("phase") == "Healthy" and (status.get("stable") or {}).get(
            "name"
        ) not in (None, revision)

    return check


def observed(api: TwoPortApi) -> list[tuple[str, str, str, str | None]]:
    out = []
    for method, path, query in api.operator_calls():
        attrs = attributes(method, path, query)
        if attrs is not None:
            out.append(attrs)
    return out


async def test_cluster_install_allows_every_call_and_grants_nothing_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render_chart({})
    (cluster_role,) = [o for o in objects if o["kind"] == "ClusterRole"]
    rules = cluster_role["rules"]
    with TwoPortApi(str(tmp_path / "kubeconfig")) as api:
        kube = KubeClient(api.test_url)
        try:
            for peering in kopf_peering_objects(objects):
                await kube.create(peering)  # Helm creates it with the release
            await kube.create(
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {
                        "name": "s3-identity",
                        "namespace": "team-a",
                        "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"},
                    },
                }
            )
            with chart_operator(api, objects, monkeypatch) as liveness_port:
                await kube.create(finetunejob("rbac-train", "team-a"))
                await train_to_success(kube, "team-a", "rbac-train", preempt_first=True)
                async with deployment_controller(kube, "team-a"):
                    # Replicas mode serving the FineTuneJob's artifact, and Gateway API mode.
                    serve = modeldeployment(
                        "rbac-serve",
                        "team-a",
                        model={"fineTuneJobRef": {"name": "rbac-train"}},
                        traffic={"mode": "replicas"},
                    )
                    route = modeldeployment(
                        "rbac-route",
                        "team-a",
                        model={"baseModel": {"uri": "s3://models/base"}},
                        traffic={"mode": "gatewayAPI", "parentRefs": [{"name": "gw"}]},
                        rollout={
                            "steps": [{"setWeight": 50}, {"pause": {}}],
                            "scaleDownDelaySeconds": 0,
                        },
                    )
                    await kube.create(serve)
                    await kube.create(route)
                    await asyncio.gather(
                        mdep_where(
                            kube, "team-a", "rbac-serve", stable_is_not(None), "first revision"
                        ),
                        mdep_where(
                            kube, "team-a", "rbac-route", stable_is_not(None), "first revision"
                        ),
                    )
                    # A canary at 50% (HTTPRoute weights), then aborted by annotation: weights back,
                    # the canary's objects deleted, the one-shot annotation removed.
                    await kube.patch(
                        API,
                        "ModelDeployment",
                        "team-a",
                        "rbac-route",
                        {"spec": {"server": {"maxBatchSize": 2}}},
                    )
                    await mdep_where(
                        kube,
                        "team-a",
                        "rbac-route",
                        lambda o: (
                            ((o.get("status") or {}).get("weights") or {}).get("canary") == 50
                        ),
                        "canary at 50%",
                    )
                    await kube.patch(
                        API,
                        "ModelDeployment",
                        "team-a",
                        "rbac-route",
                        {"metadata": {"annotations": {"kubetune.io/abort": "true"}}},
                    )
                    await mdep_where(
                        kube,
                        "team-a",
                        "rbac-route",
                        lambda o: (
                            "kubetune.io/abort" not in (o["metadata"].get("annotations") or {})
                            and not (o.get("status") or {}).get("retiring")
                            and len((o.get("status") or {}).get("rejectedRevisions") or []) == 1
                        ),
                        "abort acted on",
                    )
                    # Argo CD's view of the real statuses (argocd/health.lua in Lua 5.1).
                    assert (
                        argocd_health(await kube.get(API, "FineTuneJob", "team-a", "rbac-train"))
                        == "Healthy"
                    )
                    assert (
                        argocd_health(
                            await kube.get(API, "ModelDeployment", "team-a", "rbac-serve")
                        )
                        == "Healthy"
                    )
                    assert (
                        argocd_health(
                            await kube.get(API, "ModelDeployment", "team-a", "rbac-route")
                        )
                        == "Degraded"
                    )
                    edited = await kube.patch(
                        API, "ModelDeployment", "team-a", "rbac-serve", {"spec": {"replicas": 2}}
                    )
                    assert (
                        argocd_health(edited) == "Progressing"
                    )  # a new generation, not yet observed
                assert healthz(liveness_port) == 200
                # The chart's KUBETUNE_METRICS_PORT made kubetune.startup serve the operator's metrics.
                await wait_for(
                    lambda: scraped_phase_count("FineTuneJob", "Succeeded"), what="/metrics"
                )
                await wait_for(
                    lambda: scraped_phase_count("ModelDeployment", "Healthy"),
                    what="/metrics",
                )
            peering = await kube.get("kopf.dev/v1", "ClusterKopfPeering", None, "kubetune")
            assert peering is not None
        finally:
            await kube.close()
        calls = observed(api)

    assert calls, "the operator made no API call through its own endpoint"
    denied = sorted({(v, g, r) for v, g, r, _ in calls if not allows(rules, v, g, r)})
    assert denied == [], f"the chart's ClusterRole does not allow: {denied}"
    used = {(v, g, r) for v, g, r, _ in calls}
    unused = sorted(grants(rules) - used - set(NOT_EXERCISED))
    assert unused == [], f"granted but never used nor explained in NOT_EXERCISED: {unused}"
    stale = sorted(set(NOT_EXERCISED) - grants(rules))
    assert stale == [], f"NOT_EXERCISED lists grants the chart no longer has: {stale}"
    assert not any(r == "secrets" for _, _, r, _ in calls), "the operator must never touch Secrets"


async def test_namespaced_install_stays_in_its_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render_chart({"watchNamespaces": ["team-b"]})
    assert not [o for o in objects if o["kind"].startswith("Cluster")]
    (role,) = [o for o in objects if o["kind"] == "Role"]
    with TwoPortApi(str(tmp_path / "kubeconfig")) as api:
        kube = KubeClient(api.test_url)
        try:
            for peering in kopf_peering_objects(objects):
                await kube.create(peering)
            await kube.create(
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": "s3-identity", "namespace": "team-b"},
                }
            )
            await kube.create(
                finetunejob("elsewhere", "team-c")
            )  # not watched: must stay untouched
            with chart_operator(api, objects, monkeypatch):
                short_lived = finetunejob("rbac-ns", "team-b")
                short_lived["spec"]["ttlSecondsAfterFinished"] = 0
                await kube.create(short_lived)
                await train_to_success(kube, "team-b", "rbac-ns", then_deleted=True)
            untouched = await kube.get(API, "FineTuneJob", "team-c", "elsewhere")
            assert untouched is not None and not untouched.get("status")
        finally:
            await kube.close()
        calls = observed(api)

    assert calls
    outside = sorted({c for c in calls if c[3] != "team-b"})
    assert outside == [], (
        f"calls outside the watched namespace (a Role cannot allow them): {outside}"
    )
    denied = sorted({(v, g, r) for v, g, r, _ in calls if not allows(role["rules"], v, g, r)})
    assert denied == [], f"the chart's Role does not allow: {denied}"
    assert ("delete", "kubetune.io", "finetunejobs", "team-b") in calls  # the TTL path ran


def test_security_doc_lists_exactly_the_granted_rules() -> None:
    """docs/security.md has one table row per (apiGroup, resources, verbs) rule with its reason."""
    text = (REPO / "docs" / "security.md").read_text()
    rows = re.findall(r"^\| `([^`]*)` \| `([^`]+)` \| `([^`]+)` \| ([^|]+) \|$", text, flags=re.M)
    documented = set()
    for group, resources, verbs, reason in rows:
        assert reason.strip(), f"no reason for {resources}"
        for resource in resources.split(", "):
            for verb in verbs.split(", "):
                documented.add((verb, "" if group == "core" else group, resource))
    cluster = grants(next(o for o in render_chart({}) if o["kind"] == "ClusterRole")["rules"])
    namespaced = grants(
        next(o for o in render_chart({"watchNamespaces": ["x"]}) if o["kind"] == "Role")["rules"]
    )
    assert documented == cluster | namespaced, (
        f"undocumented: {sorted((cluster | namespaced) - documented)}; not granted: {sorted(documented - cluster - namespaced)}"
    )
