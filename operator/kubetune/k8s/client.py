"""The async Kubernetes client every operator-side API call goes through.

One small REST layer over aiohttp, so that it works identically against a real cluster and
against kmock's emulator on loopback (tests), without the generated ``kubernetes`` models
(which are slow to build and drop fields they do not know, e.g. of our own CRDs).

Connection settings come from, in order: an explicit ``KubeClient(server=...)``; the in-cluster
ServiceAccount (``KUBERNETES_SERVICE_HOST``); ``$KUBECONFIG`` / ``~/.kube/config`` read by the
``kubernetes`` package's loader (so exec plugins, client certificates and tokens all work).

API (all coroutines unless noted; objects are plain dicts, the wire form):

``client = await get_client()``
    The shared client of the running event loop (one aiohttp session per loop: Kopf runs its
    own loop, tests and the benchmark run theirs).
``await client.get(api_version, kind, namespace, name) -> dict | None``
    None when the object does not exist (404).
``await client.list(api_version, kind, namespace=None, labels=None) -> list[dict]``
    ``labels`` is a dict of equality requirements, sent as a labelSelector AND re-checked
    client-side (kmock does not filter selectors; a real server already did).
``await client.create(obj) -> (dict, created: bool)``
    Idempotent (DESIGN.md, child objects): on 409 the existing object is read and returned with
    ``created=False``; nothing is overwritten.
``await client.apply(obj, compare=(...)) -> (dict, action)``
    Create, or read-and-compare: when any top-level path in ``compare`` (default
    ``("spec",)`` where present, plus labels) differs, merge-patch it. ``action`` is
    ``"created"``, ``"patched"`` or ``"unchanged"``. Never use it for Jobs' immutable pod
    templates (compare only what may change).
``await client.patch(api_version, kind, namespace, name, patch, subresource=None) -> dict | None``
    JSON merge patch (``None`` values delete keys). None when the object is gone.
``await client.patch_status(api_version, kind, namespace, name, old, new) -> dict | None``
    The one status write of a reconcile: computes the merge patch from ``old`` to ``new`` and
    sends it to ``/status`` only when something changed (returns None when nothing was sent).
``await client.delete(api_version, kind, namespace, name, propagation="Background") -> bool``
    False when it was already gone.
``await client.post_event(obj, type_, reason, message) -> None``
    A core/v1 Event about ``obj``; failures are logged, never raised (Events are best effort).
``merge_patch(old, new) -> dict`` (plain function)
    The RFC 7386 merge patch turning ``old`` into ``new``.
``resource_path(api_version, kind, namespace=None, name=None, subresource=None) -> str``
    (plain function) URL path of a collection or an object.

Errors other than the handled 404/409 raise :class:`ApiError` with the server's status code,
reason and message, which Kopf turns into a retry with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import uuid
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from kubetune.api.times import now_rfc3339

log = logging.getLogger(__name__)

# kind -> plural for every kind kubetune touches; others fall back to lower(kind)+"s".
PLURALS: dict[str, str] = {
    "FineTuneJob": "finetunejobs",
    "ModelDeployment": "modeldeployments",
    "Job": "jobs",
    "Pod": "pods",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Secret": "secrets",
    "ConfigMap": "configmaps",
    "Event": "events",
    "Deployment": "deployments",
    "ReplicaSet": "replicasets",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "HTTPRoute": "httproutes",
    "Endpoints": "endpoints",
    "EndpointSlice": "endpointslices",
    "Namespace": "namespaces",
    "Lease": "leases",
}

# Cluster-scoped kinds (no namespace segment in the path).
CLUSTER_SCOPED = {"Namespace", "Node", "CustomResourceDefinition", "PriorityClass"}

IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


class ApiError(Exception):
    """A Kubernetes API error: HTTP status, reason and the server's message."""

    def __init__(self, status: int, reason: str, message: str, method: str = "", path: str = ""):
        super().__init__(f"{method} {path}: HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def plural_of(kind: str) -> str:
    """The resource plural of a kind (table above, else the English-naive lower(kind)+'s')."""
    return PLURALS.get(kind) or kind.lower() + "s"


def resource_path(
    api_version: str,
    kind: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """URL path of a collection (name None) or an object, optionally of its subresource."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base]
    if namespace and kind not in CLUSTER_SCOPED:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural_of(kind))
    if name:
        parts.append(name)
        if subresource:
            parts.append(subresource)
    return "/".join(parts)


def merge_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, Any]:
    """RFC 7386 merge patch from ``old`` to ``new``: changed keys, ``None`` for removed ones.

    Lists are replaced whole (merge-patch semantics), so a changed condition list is sent as a
    whole list; that is what the API server expects for CRD status (no strategic merge there).
    """
    old = old or {}
    new = new or {}
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key, _MISSING)
        if before == value:
            continue
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        else:
            patch[key] = value
    return patch


_MISSING = object()


def _labels_match(obj: Mapping[str, Any], labels: Mapping[str, str] | None) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in (labels or {}).items())


def _kubeconfig_token(cfg: Any) -> str | None:
    """The bearer token the ``kubernetes`` loader put into a Configuration, if any.

    kubernetes < 35 keeps it under ``api_key["authorization"]``; 35 and later under
    ``api_key["BearerToken"]`` (``"Bearer <token>"``). Reading only the first made every token
    kubeconfig (a ServiceAccount's, an exec plugin's) call as system:anonymous: found by the
    real API server, which answered 403 to the operator's reconciles.
    """
    keys = cfg.api_key or {}
    for key in ("authorization", "BearerToken"):
        auth = keys.get(key)
        if not auth:
            continue
        prefix = (cfg.api_key_prefix or {}).get(key)
        if prefix and prefix.lower() != "bearer":
            return str(auth).strip()
        # .strip(): the loader keeps a tokenFile's trailing newline, which no header may carry.
        return (auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else str(auth)).strip()
    return None


class KubeClient:
    """A thin async REST client for the Kubernetes API (see the module docstring)."""

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        token_file: str | None = None,
        ssl_context: ssl.SSLContext | bool | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.server = server.rstrip("/")
        self._token = token
        self._token_file = token_file
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_environment(cls) -> KubeClient:
        """In-cluster ServiceAccount when running in a pod, else the kubeconfig."""
        if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(IN_CLUSTER_TOKEN):
            host = os.environ["KUBERNETES_SERVICE_HOST"]
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if ":" in host:  # IPv6 literal
                host = f"[{host}]"
            ctx = ssl.create_default_context(cafile=IN_CLUSTER_CA)
            # NB: the projected token rotates; re-read the file instead of caching it.
            return cls(f"https://{host}:{port}", token_file=IN_CLUSTER_TOKEN, ssl_context=ctx)
        return cls.from_kubeconfig()

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None) -> KubeClient:
        """Read a kubeconfig with the ``kubernetes`` package's loader (exec plugins included)."""
        from kubernetes import config as kconfig
        from kubernetes.client import Configuration

        cfg = Configuration()
        # NB: the kubernetes package reads $KUBECONFIG once, at import time; read it now so a
        # changed environment (tests, embedding) is honoured.
        path = path or os.environ.get("KUBECONFIG") or None
        kconfig.load_kube_config(config_file=path, context=context, client_configuration=cfg)
        token = _kubeconfig_token(cfg)
        ctx: ssl.SSLContext | bool | None = None
        if cfg.host.startswith("https"):
            if not cfg.verify_ssl:
                ctx = False
            else:
                ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.cert_file and isinstance(ctx, ssl.SSLContext):
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        return cls(cfg.host, token=token, ssl_context=ctx)

    # --- plumbing ---------------------------------------------------------------------------

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "kubetune-operator"}
        token = self._token
        if self._token_file:
            try:
                with open(self._token_file) as fh:
                    token = fh.read().strip()
            except OSError:
                pass
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # NB: keep connections alive and allow many in parallel: the operator reconciles
            # many objects concurrently, each with several calls.
            connector = aiohttp.TCPConnector(
                limit=64, ssl=self._ssl if self._ssl is not None else None
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        allow: Iterable[int] = (),
    ) -> tuple[int, Any]:
        """Send one request; returns (status, parsed JSON). Raises ApiError unless 2xx or allowed."""
        sess = await self._sess()
        data = None if body is None else json.dumps(body)
        async with sess.request(
            method,
            self.server + path,
            data=data,
            params=params,
            headers=self._headers(content_type if body is not None else None),
        ) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = {"message": text}
            if resp.status < 300 or resp.status in set(allow):
                return resp.status, payload
            reason = (
                (payload or {}).get("reason", resp.reason or "")
                if isinstance(payload, dict)
                else ""
            )
            message = (payload or {}).get("message", text) if isinstance(payload, dict) else text
            raise ApiError(resp.status, str(reason), str(message)[:500], method, path)

    # --- verbs ------------------------------------------------------------------------------

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict | None:
        """The object, or None when it does not exist."""
        status, obj = await self.request(
            "GET", resource_path(api_version, kind, namespace, name), allow=(404,)
        )
        return None if status == 404 else obj

    async def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
        field_selector: str | None = None,
    ) -> list[dict]:
        """Objects of a kind in a namespace (or all), filtered by equality label requirements.

        ``field_selector`` (e.g. ``spec.nodeName=n1``) is applied by the API server only.
        """
        params: dict[str, str] = {}
        if labels:
            params["labelSelector"] = ",".join(f"{k}={v}" for k, v in labels.items())
        if field_selector:
            params["fieldSelector"] = field_selector
        status, payload = await self.request(
            "GET", resource_path(api_version, kind, namespace), params=params or None, allow=(404,)
        )
        if status == 404 or not payload:
            return []
        return [item for item in payload.get("items") or [] if _labels_match(item, labels)]

    async def create(self, obj: Mapping[str, Any]) -> tuple[dict, bool]:
        """Create; on 409 read the existing object instead. Returns (object, created)."""
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        path = resource_path(obj["apiVersion"], obj["kind"], ns)
        status, payload = await self.request("POST", path, body=dict(obj), allow=(409,))
        if status != 409:
            return payload, True
        existing = await self.get(obj["apiVersion"], obj["kind"], ns, name)
        if existing is None:
            # Deleted between our POST and GET (e.g. being garbage-collected): let Kopf retry.
            raise ApiError(
                409,
                "Conflict",
                f"{obj['kind']} {ns}/{name} exists but cannot be read",
                "POST",
                path,
            )
        return existing, False

    async def apply(
        self, obj: Mapping[str, Any], compare: Iterable[str] | None = None
    ) -> tuple[dict, str]:
        """Create, or read and merge-patch the compared top-level fields when they differ."""
        current, created = await self.create(obj)
        if created:
            return current, "created"
        keys = (
            list(compare)
            if compare is not None
            else [k for k in ("spec", "rules", "subjects", "roleRef", "data") if k in obj]
        )
        desired: dict[str, Any] = {k: obj[k] for k in keys if k in obj}
        present: dict[str, Any] = {k: current.get(k) for k in keys if k in obj}
        want_labels = (obj.get("metadata") or {}).get("labels") or {}
        have_labels = (current.get("metadata") or {}).get("labels") or {}
        patch = merge_patch(present, desired)
        # Only add or correct our labels; never remove someone else's.
        label_patch = {k: v for k, v in want_labels.items() if have_labels.get(k) != v}
        # Keep only additions/changes for compared fields too: a server-defaulted field that we
        # did not set is not a difference.
        patch = _drop_deletions(patch)
        if label_patch:
            patch.setdefault("metadata", {})["labels"] = label_patch
        if not patch:
            return current, "unchanged"
        meta = obj["metadata"]
        patched = await self.patch(
            obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], patch
        )
        return patched or current, "patched"

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
    ) -> dict | None:
        """JSON merge patch; None when the object is gone."""
        status, obj = await self.request(
            "PATCH",
            resource_path(api_version, kind, namespace, name, subresource),
            body=dict(patch),
            content_type="application/merge-patch+json",
            allow=(404,),
        )
        return None if status == 404 else obj

    async def patch_status(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any],
    ) -> dict | None:
        """Send the merge patch from ``old`` to ``new`` status to /status, only when it changed."""
        diff = merge_patch(old or {}, new)
        if not diff:
            return None
        return await self.patch(
            api_version, kind, namespace, name, {"status": diff}, subresource="status"
        )

    async def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
    ) -> bool:
        """Delete with a propagation policy (Background: dependents are garbage-collected)."""
        status, _ = await self.request(
            "DELETE",
            resource_path(api_version, kind, namespace, name),
            body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation},
            allow=(404,),
        )
        return status != 404

    async def post_event(
        self, obj: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """Post a core/v1 Event about ``obj`` (best effort: failures are logged only)."""
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta.get('name', 'object')}.{uuid.uuid4().hex[:16]}",
                "namespace": ns,
            },
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": ns,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kubetune-operator"},
            "reportingComponent": "kubetune.io/operator",
            "reportingInstance": os.environ.get("HOSTNAME", "kubetune-operator"),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.request("POST", resource_path("v1", "Event", ns), body=event)
        except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
            log.warning("could not post Event %s for %s/%s: %s", reason, ns, meta.get("name"), exc)


def _drop_deletions(patch: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in patch.items():
        if value is None:
            continue
        if isinstance(value, dict):
            sub = _drop_deletions(value)
            if sub:
                out[key] = sub
        else:
            out[key] = value
    return out


# One client per event loop: aiohttp sessions are bound to the loop that created them.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, KubeClient] = (
    weakref.WeakKeyDictionary()
)
_factory_override: list[Any] = []


def set_client_factory(factory: Any | None) -> None:
    """Make :func:`get_client` build clients with ``factory()`` (None restores the default).

    For embedding (the local runtime, benchmarks): the default is
    :meth:`KubeClient.from_environment`.
    """
    _factory_override[:] = [factory] if factory else []
    _clients.clear()


async def get_client() -> KubeClient:
    """The shared client of the running event loop."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        factory = _factory_override[0] if _factory_override else KubeClient.from_environment
        client = factory()
        _clients[loop] = client
    return client
