"""A pod runner that plays the kubelet for the test cluster: pods run as host processes or containers.

``python -m tests.cluster.noderunner --kubeconfig K --workdir D --node cpu-0:cpu --node gpu-0:gpu``

For each node it:

- registers a Node with real-looking capacity (the ``gpu`` kind: ``nvidia.com/gpu: 8``, the GPU
  product label and the ``nvidia.com/gpu:NoSchedule`` taint the GPU operator puts on such
  nodes), reports it Ready and keeps its Lease in ``kube-node-lease`` fresh;
- runs every container of every Pod the scheduler binds to it as a host process. The pod
  template is resolved by :func:`kubetune.local.containers.to_process`, the same code the local
  runtime uses (command, env with secretKeyRef/fieldRef, emptyDir folders);
- gives each pod its own address as ``status.podIP``, from ``198.18.0.0/16`` (a benchmarking
  range no real network uses), made local to the host by one route (``ip route replace local
  198.18.0.0/16 dev lo``, left in place: harmless, and another runner may use it). Loopback
  addresses will not do: the API server refuses them in EndpointSlices. Pods share the host's
  network (no network namespace per pod), so an ``LD_PRELOAD`` shim (``shim/podip.c``) turns a
  bind to ``0.0.0.0`` into a bind to the pod's address: two pods serve the same port without
  colliding, and command, args and env stay as built;
- runs each container in its own mount namespace (``unshare --mount``) with its volumes
  bind-mounted at their mountPaths: emptyDirs, Secrets, ConfigMaps, the projected
  ServiceAccount token (a real token from the TokenRequest API, bound to the pod) at
  ``/var/run/secrets/kubernetes.io/serviceaccount``, and the termination-message file at
  ``terminationMessagePath``. ``KUBERNETES_SERVICE_HOST``/``PORT`` name the API server, so a
  pod's process reaches it exactly as in a cluster and the real RBAC authorizer judges it;
- reports what a kubelet reports: phase, Running and Ready (readiness probe), restarts with
  ``lastState``, ``state.terminated`` with the exit code and the termination message;
- stops the processes when their Pod is deleted, honouring the grace period (SIGTERM, then
  SIGKILL), then removes the Pod (the kubelet's final delete with grace 0).

Container mode (``--images``; ``KUBETUNE_CLUSTER_IMAGES=1`` for the cluster tier): each
container runs in kubetune's own image (``make images``) under podman instead of as a host
process, with the images tier's converter (tests/images/podman.py): the image's user, a
read-only root, dropped capabilities, the volumes above bind-mounted, the host's network with
the same bind shim.

It authenticates as the test admin (a real kubelet uses the Node authorizer). It is
level-triggered: every ``--sync`` seconds it lists its pods and reconciles each.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kubetune.api.times import now_rfc3339
from kubetune.k8s.client import ApiError, KubeClient
from kubetune.local.containers import pod_spec_of, to_process
from kubetune.local.processes import ProcessSpec, Supervisor
from tests.images.podman import IMAGES, image_config, image_ref, podman, podman_env, run_args

log = logging.getLogger("noderunner")

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
KUBELET_VERSION = "v1.36.3"


def micro_now() -> str:
    # Leases are MicroTime: RFC 3339 with microseconds (the one form api/times.py does not write).
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


def node_manifest(name: str, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Node object, its status) for a ``cpu`` or ``gpu`` node."""
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubetune.io/test-node": "noderunner",
    }
    capacity = {"cpu": "16", "memory": "128Gi", "pods": "110", "ephemeral-storage": "500Gi"}
    spec: dict[str, Any] = {}
    if kind == "gpu":
        labels.update(
            {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.memory": "81559",
                "nvidia.com/gpu.count": "8",
            }
        )
        capacity.update({"cpu": "96", "memory": "1024Gi", "nvidia.com/gpu": "8"})
        spec["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }
    status = {
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ],
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "kubetune-noderunner://1",
            "osImage": "host processes",
            "kernelVersion": os.uname().release,
            "bootID": "",
            "machineID": "",
            "systemUUID": "",
        },
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    }
    return node, status


def ready_conditions() -> list[dict[str, Any]]:
    stamp = now_rfc3339()
    return [
        {
            "type": t,
            "status": s,
            "reason": r,
            "message": m,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
        for t, s, r, m in (
            ("Ready", "True", "KubeletReady", "noderunner is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
        )
    ]


# --------------------------------------------------------------------------------------------
# Pods
# --------------------------------------------------------------------------------------------


@dataclass
class ContainerRun:
    """One container of a running pod."""

    name: str
    spec: dict[str, Any]
    restarts: int = 0
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    process: str = ""


@dataclass
class PodRun:
    """A pod this node runs."""

    namespace: str
    name: str
    uid: str
    ip: str
    folder: Path
    pod: dict[str, Any]
    containers: dict[str, ContainerRun] = field(default_factory=dict)
    init_done: bool = False
    phase: str = "Pending"
    start_time: str = field(default_factory=now_rfc3339)
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    status_sent: dict[str, Any] = field(default_factory=dict)
    # secretKeyRef values of the pod's env, read again before each container start.
    secrets: dict[tuple[str, str], str] = field(default_factory=dict)
    message: str = ""
    # The last status patch failed (a timeout on a loaded API server): the sync loop resends it.
    report_failed: bool = False


class NodeRunner:
    """Registers the nodes and runs their pods (see the module docstring)."""

    def __init__(
        self,
        client: KubeClient,
        workdir: Path,
        nodes: list[tuple[str, str]],
        api_host: str,
        api_port: int,
        sync_seconds: float = 0.5,
        shim: Path | None = None,
        subnet: int = 0,
        images: bool = False,
    ) -> None:
        self.client = client
        self.workdir = workdir
        self.nodes = nodes
        self.api_host = api_host
        self.api_port = api_port
        self.sync_seconds = sync_seconds
        self.shim = shim
        # Container mode: every container runs in kubetune's own image under podman.
        self.images = images
        self._image_configs: dict[str, dict[str, Any]] = {}
        # Paths that stand in for the container image: never hidden by a volume mount.
        self.keep = _outermost([str(Path.cwd()), sys.prefix, str(workdir.resolve())])
        self.supervisor = Supervisor(registry=workdir / "processes.json", grace_seconds=30)
        self.pods: dict[str, PodRun] = {}
        # Pod addresses: 198.18.<subnet+k>.<1..250>; each runner starts at its own subnet.
        self._ips = (f"198.18.{(subnet + i // 250) % 256}.{1 + i % 250}" for i in range(250 * 256))
        self._stop = asyncio.Event()

    # --- nodes ------------------------------------------------------------------------------

    async def register(self) -> None:
        for name, kind in self.nodes:
            node, status = node_manifest(name, kind)
            with contextlib.suppress(ApiError):
                await self.client.create(node)
            await self._post_node_status(name, status)
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {
                    "holderIdentity": name,
                    "leaseDurationSeconds": 40,
                    "renewTime": micro_now(),
                },
            }
            with contextlib.suppress(ApiError):
                await self.client.create(lease)

    async def _post_node_status(self, name: str, status: dict[str, Any] | None = None) -> None:
        body = dict(status or {})
        body["conditions"] = ready_conditions()
        await self.client.patch("v1", "Node", None, name, {"status": body}, subresource="status")

    async def heartbeat(self) -> None:
        while not self._stop.is_set():
            for name, _kind in self.nodes:
                try:
                    await self.client.patch(
                        "coordination.k8s.io/v1",
                        "Lease",
                        "kube-node-lease",
                        name,
                        {"spec": {"renewTime": micro_now(), "holderIdentity": name}},
                    )
                    await self._post_node_status(name)
                except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
                    log.warning("heartbeat of %s: %s", name, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 10)

    # --- the sync loop ----------------------------------------------------------------------

    async def run(self) -> None:
        await self.register()
        beat = asyncio.create_task(self.heartbeat())
        try:
            while not self._stop.is_set():
                try:
                    await self.sync()
                except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
                    log.warning("sync: %s", exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.sync_seconds)
        finally:
            beat.cancel()
            await self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def sync(self) -> None:
        seen: set[str] = set()
        for node, _kind in self.nodes:
            pods = await self.client.list("v1", "Pod", None, field_selector=f"spec.nodeName={node}")
            for pod in pods:
                # List items carry no kind; the container resolver dispatches on it.
                pod.setdefault("apiVersion", "v1")
                pod.setdefault("kind", "Pod")
                uid = pod["metadata"]["uid"]
                seen.add(uid)
                run = self.pods.get(uid)
                if run is None:
                    if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                        # Finished before this runner started (a restart): nothing to run.
                        if pod["metadata"].get("deletionTimestamp"):
                            await self._final_delete(pod)
                        continue
                    run = self._admit(pod)
                run.pod = pod
                if pod["metadata"].get("deletionTimestamp") and not run.stopping:
                    run.stopping = True
                    asyncio.create_task(self._terminate(run))
        # Status is level-triggered too: a patch that failed is sent again, as the kubelet's
        # status manager does, or the pod would keep its stale status (a Deployment 1/2 ready).
        for run in list(self.pods.values()):
            if run.report_failed and not run.stopping:
                await self._report(run)
        # Pods deleted with grace 0 (force): stop what is left of them.
        for uid, run in list(self.pods.items()):
            if uid not in seen and not run.stopping:
                run.stopping = True
                asyncio.create_task(self._terminate(run, final_delete=False))

    def _admit(self, pod: dict[str, Any]) -> PodRun:
        meta = pod["metadata"]
        run = PodRun(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            ip=next(self._ips),
            folder=self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}",
            pod=pod,
        )
        spec = pod["spec"]
        for container in spec.get("containers") or []:
            run.containers[container["name"]] = ContainerRun(container["name"], container)
        self.pods[run.uid] = run
        run.task = asyncio.create_task(self._drive(run))
        return run

    # --- one pod ----------------------------------------------------------------------------

    async def _drive(self, run: PodRun) -> None:
        try:
            # Pod set-up (volumes, the token, Secrets, init containers) is retried with a
            # back-off, as the kubelet's pod sync is: a Secret created after its pod, or an API
            # call that timed out on a loaded machine, delays the pod instead of stranding it.
            await self._until_done(run, "pod set-up", self._set_up, run)
            if run.phase == "Failed":
                await self._report(run)
                return
            await asyncio.gather(*(self._container_loop(run, c) for c in run.containers.values()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a pod that cannot start says why, as a kubelet would
            log.exception("pod %s/%s", run.namespace, run.name)
            run.message = str(exc)[:500]
            for c in run.containers.values():
                c.state = {"waiting": {"reason": "CreateContainerError", "message": run.message}}
            await self._report(run)

    async def _set_up(self, run: PodRun) -> None:
        await self._prepare_volumes(run)
        await self._run_init_containers(run)

    async def _until_done(
        self,
        run: PodRun,
        what: str,
        step: Any,
        *args: Any,
        containers: list[ContainerRun] | None = None,
    ) -> Any:
        """``await step(*args)`` until it succeeds (back-off 0.5 s doubling to 10 s), as the kubelet.

        Each failure is logged and reported on the waiting containers as
        ``CreateContainerConfigError`` with its message, the way the kubelet reports a container
        it cannot create yet (``secret "x" not found``).
        """
        delay = 0.5
        while True:
            try:
                return await step(*args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "pod %s/%s: %s failed (retry in %.1fs): %s",
                    run.namespace,
                    run.name,
                    what,
                    delay,
                    exc,
                )
                run.message = str(exc)[:500]
                for c in containers if containers is not None else run.containers.values():
                    if "running" not in c.state:
                        c.state = {
                            "waiting": {
                                "reason": "CreateContainerConfigError",
                                "message": run.message,
                            }
                        }
                await self._report(run)
            if run.stopping:
                raise asyncio.CancelledError
            await asyncio.sleep(delay)
            delay = min(10.0, delay * 2)

    async def _prepare_volumes(self, run: PodRun) -> None:
        """Materialize the pod's volumes under its folder (waiting for missing sources)."""
        run.folder.mkdir(parents=True, exist_ok=True)
        spec = pod_spec_of(run.pod)
        for volume in spec.get("volumes") or []:
            target = run.folder / "volumes" / volume["name"]
            target.mkdir(parents=True, exist_ok=True)
            while True:
                missing = await self._fill_volume(run, volume, target)
                if not missing:
                    break
                run.message = missing
                for c in run.containers.values():
                    c.state = {"waiting": {"reason": "ContainerCreating", "message": missing}}
                await self._report(run)
                await asyncio.sleep(1)

    async def _fill_volume(self, run: PodRun, volume: dict[str, Any], target: Path) -> str | None:
        """Write one volume's files; returns what is missing (retry later) or None.

        Secret and ConfigMap sources are the same whether a volume or a projection names them
        (a volume's Secret says ``secretName``, a projection's ``name``).
        """
        sources: list[tuple[str, dict[str, Any]]] = []
        if "secret" in volume:
            sources.append(("Secret", {**volume["secret"], "name": volume["secret"]["secretName"]}))
        elif "configMap" in volume:
            sources.append(("ConfigMap", volume["configMap"]))
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "serviceAccountToken" in source:
                sat = source["serviceAccountToken"]
                (target / sat.get("path", "token")).write_text(await self._token(run, sat))
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    path = item.get("fieldRef", {}).get("fieldPath", "")
                    value = {"metadata.namespace": run.namespace, "metadata.name": run.name}.get(
                        path, ""
                    )
                    (target / item["path"]).write_text(value)
            elif "secret" in source or "configMap" in source:
                kind = "Secret" if "secret" in source else "ConfigMap"
                sources.append((kind, source["secret" if kind == "Secret" else "configMap"]))
        for kind, src in sources:
            obj = await self.client.get("v1", kind, run.namespace, src["name"])
            if obj is None:
                if src.get("optional"):
                    continue
                return f'{kind.lower()} "{src["name"]}" not found'
            data = obj.get("data") or {}
            decoded = (
                {k: base64.b64decode(v) for k, v in data.items()}
                if kind == "Secret"
                else {k: v.encode() for k, v in data.items()}
            )
            self._write_items(target, decoded, src.get("items"))
        # emptyDir: the folder itself; hostPath and others are not supported by this runner.
        return None

    @staticmethod
    def _write_items(
        target: Path, data: dict[str, bytes], items: list[dict[str, Any]] | None
    ) -> None:
        chosen = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
        for key, path in chosen.items():
            if key in data:
                out = target / path
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data[key])

    async def _token(self, run: PodRun, source: dict[str, Any]) -> str:
        account = pod_spec_of(run.pod).get("serviceAccountName") or "default"
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": int(source.get("expirationSeconds", 3607)),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": run.name,
                    "uid": run.uid,
                },
            },
        }
        if source.get("audience"):
            body["spec"]["audiences"] = [source["audience"]]
        _, result = await self.client.request(
            "POST", f"/api/v1/namespaces/{run.namespace}/serviceaccounts/{account}/token", body=body
        )
        return str(result["status"]["token"])

    async def _start(self, run: PodRun, c: ContainerRun) -> ProcessSpec:
        """Start one container's process; raises (to be retried) when it cannot be created."""
        await self._resolve_secrets(run)  # a Secret may have appeared since the last try
        spec = await self._process_spec(run, c.spec)
        await self.supervisor.start(spec)
        c.process = spec.name
        return spec

    async def _process_spec(self, run: PodRun, container: dict[str, Any]) -> ProcessSpec:
        if self.images:
            image = local_image(container.get("image", ""))
            if image not in self._image_configs:
                # ``podman image inspect`` off the event loop: it waits for podman's storage
                # lock, which a concurrent ``make images`` holds for minutes at a time.
                self._image_configs[image] = await asyncio.to_thread(image_config, image)
        secrets = run.secrets
        spec = to_process(
            run.pod,
            process_name=f"{run.namespace}/{run.name}/{container['name']}/{run.uid[:8]}",
            run_dir=run.folder,
            cache_dir=run.folder / "volumes" / "cache",
            secret_lookup=lambda name, key: secrets.get((name, key)),
            container_name=container["name"],
        )
        spec.log_path = run.folder / f"{container['name']}.log"
        env = spec.env
        for item in container.get("env") or []:
            path = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if path == "status.podIP":
                env[item["name"]] = run.ip
            elif path == "spec.nodeName":
                env[item["name"]] = pod_spec_of(run.pod).get("nodeName", "")
        if self.images:
            return self._container_spec(run, container, spec)
        env["HOSTNAME"] = run.name
        env["KUBERNETES_SERVICE_HOST"] = self.api_host
        env["KUBERNETES_SERVICE_PORT"] = str(self.api_port)
        env["KUBETUNE_POD_IP"] = run.ip
        if self.shim is not None:
            env["LD_PRELOAD"] = str(self.shim)
        # The image's PATH: the interpreter's folder first (kopf, torchrun, ... live there).
        env["PATH"] = os.pathsep.join(
            [os.path.dirname(sys.executable), env.get("PATH", os.defpath)]
        )
        # The container's view of the filesystem: every volume at its mountPath.
        volumes = {v["name"]: v for v in pod_spec_of(run.pod).get("volumes") or []}
        binds: list[tuple[str, str, bool, bool]] = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                continue
            source = run.folder / "volumes" / mount["name"]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            binds.append((str(source), mount["mountPath"], bool(mount.get("readOnly")), False))
        term = run.folder / f"{container['name']}.termination-log"
        term.write_text("")
        binds.append(
            (
                str(term),
                container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH,
                False,
                True,
            )
        )
        binds.sort(key=lambda b: len(b[1]))
        script = ["set -e"]
        # What stands in for the image (this checkout, its virtualenv, the runner's folders)
        # must stay visible even when a volume is mounted over a parent of it: a pod's
        # emptyDir at /tmp would hide a checkout under /tmp (CI clones may live there). Such a
        # path is bound aside before the mount and bound back into the new tree after it.
        stash = STASH_ROOT / f"{run.uid[:8]}-{container['name']}"
        kept = 0
        for source, target, read_only, is_file in binds:
            q_src, q_dst = shlex.quote(source), shlex.quote(target)
            hidden = [
                k for k in self.keep if not is_file and k.startswith(target.rstrip("/") + "/")
            ]
            for path in hidden:
                kept += 1
                aside = shlex.quote(str(stash / str(kept)))
                script.append(f"mkdir -p {aside} && mount --bind {shlex.quote(path)} {aside}")
            if is_file:
                script.append(f"mkdir -p $(dirname {q_dst}) && touch {q_dst}")
            else:
                script.append(f"mkdir -p {q_dst}")
            script.append(f"mount --bind {q_src} {q_dst}")
            if read_only:
                script.append(f"mount -o remount,bind,ro {q_dst}")
            for i, path in enumerate(hidden, start=kept - len(hidden) + 1):
                aside = shlex.quote(str(stash / str(i)))
                script.append(
                    f"mkdir -p {shlex.quote(path)} && mount --bind {aside} {shlex.quote(path)}"
                )
        script.append('exec "$@"')
        spec.argv = [
            "unshare", "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", "\n".join(script), "container", *spec.argv,
        ]  # fmt: skip
        return spec

    def _container_spec(
        self, run: PodRun, container: dict[str, Any], spec: ProcessSpec
    ) -> ProcessSpec:
        """Container mode: ``podman run`` of the container in its kubetune image.

        The arguments come from :func:`tests.images.podman.run_args`, the images tier's
        converter (user, read-only root, capabilities, env, volumes); the volumes are the
        folders this runner filled (Secrets, ConfigMaps, the projected token, emptyDirs). What a
        node adds on its own is the same as for processes: the API server's address, the pod
        address and the bind shim (mounted into the container; the images' glibc is Debian's).
        """
        image = local_image(container.get("image", ""))  # its config: see _process_spec
        secrets: dict[str, dict[str, str]] = {}
        for (name, key), value in run.secrets.items():
            secrets.setdefault(name, {})[key] = value
        pod_spec = pod_spec_of(run.pod)
        node_env = {
            "HOSTNAME": run.name,
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            "KUBETUNE_POD_IP": run.ip,
        }
        node_files: dict[Path, str] = {}
        if self.shim is not None:
            node_env["LD_PRELOAD"] = str(self.shim)
            node_files[self.shim] = str(self.shim)
        volumes = {
            v["name"]: run.folder / "volumes" / v["name"] for v in pod_spec.get("volumes") or []
        }
        converted = run_args(
            pod_spec,
            image=image,
            container_name=container["name"],
            secrets=secrets,
            pod_fields={
                "metadata.name": run.name,
                "metadata.namespace": run.namespace,
                "metadata.uid": run.uid,
                "status.podIP": run.ip,
                "spec.nodeName": pod_spec.get("nodeName", ""),
            },
            scratch=run.folder,
            name=container_name(run, container["name"]),
            node_env=node_env,
            node_files=node_files,
            config=self._image_configs[image],
            volume_dirs=volumes,
            termination_log=run.folder / f"{container['name']}.termination-log",
        )
        # --replace: a restarted container takes over its predecessor's name.
        spec.argv = ["podman", "--runtime", "runc", "run", "--replace", *converted.args]
        spec.env = podman_env()
        return spec

    async def _remove_containers(self, run: PodRun) -> None:
        """Container mode: remove what SIGKILL of ``podman run`` may have left running."""
        if not self.images:
            return
        names = [container_name(run, c.name) for c in run.containers.values()]
        await asyncio.to_thread(
            podman, "rm", "--force", "--ignore", "--time", "0", *names, check=False
        )

    async def _resolve_secrets(self, run: PodRun) -> None:
        secrets: dict[tuple[str, str], str] = {}
        spec = pod_spec_of(run.pod)
        for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            for item in container.get("env") or []:
                ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                if ref and (ref.get("name"), ref["key"]) not in secrets:
                    secret = await self.client.get("v1", "Secret", run.namespace, ref.get("name"))
                    data = (secret or {}).get("data") or {}
                    if ref["key"] in data:
                        secrets[(ref.get("name"), ref["key"])] = base64.b64decode(
                            data[ref["key"]]
                        ).decode()
        run.secrets = secrets

    async def _run_init_containers(self, run: PodRun) -> None:
        await self._resolve_secrets(run)
        for container in pod_spec_of(run.pod).get("initContainers") or []:
            spec = await self._process_spec(run, container)
            await self.supervisor.start(spec)
            code = await self.supervisor.wait(spec.name)
            if code != 0:
                run.phase = "Failed"
                run.message = f"init container {container['name']} exited with {code}"
                return
        run.init_done = True

    async def _container_loop(self, run: PodRun, c: ContainerRun) -> None:
        policy = pod_spec_of(run.pod).get("restartPolicy", "Always")
        probe = c.spec.get("readinessProbe")
        while not run.stopping:
            spec = await self._until_done(
                run, f"container {c.name}", self._start, run, c, containers=[c]
            )
            c.state = {"running": {"startedAt": now_rfc3339()}}
            startup = c.spec.get("startupProbe")
            c.started = startup is None
            c.ready = probe is None and startup is None
            run.phase = "Running"
            await self._report(run)
            prober = (
                asyncio.create_task(self._probes(run, c, startup, probe))
                if probe or startup
                else None
            )
            code = await self.supervisor.wait(spec.name)
            if prober:
                prober.cancel()
            c.ready = False
            term = run.folder / f"{c.name}.termination-log"
            message = term.read_text(errors="replace")[-4096:] if term.exists() else ""
            if (
                not message
                and code != 0
                and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
            ):
                logfile = spec.log_path
                if logfile and logfile.exists():
                    message = "\n".join(logfile.read_text(errors="replace").splitlines()[-80:])[
                        -2048:
                    ]
            terminated = {
                "exitCode": int(code if code is not None and code >= 0 else 128 - (code or 0)),
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": c.state.get("running", {}).get("startedAt", now_rfc3339()),
                "finishedAt": now_rfc3339(),
            }
            if message:
                terminated["message"] = message
            c.state = {"terminated": terminated}
            if run.stopping:
                break
            restart = policy == "Always" or (policy == "OnFailure" and code != 0)
            if not restart:
                others = [o for o in run.containers.values() if o is not c]
                if all("terminated" in o.state for o in others):
                    codes = [o.state["terminated"]["exitCode"] for o in run.containers.values()]
                    run.phase = "Succeeded" if all(x == 0 for x in codes) else "Failed"
                await self._report(run)
                return
            c.last_state = {"terminated": terminated}
            c.restarts += 1
            c.state = {"waiting": {"reason": "CrashLoopBackOff" if code else "Completed"}}
            await self._report(run)
            await asyncio.sleep(min(10.0, 0.5 * 2 ** min(c.restarts, 5)))

    async def _probes(
        self,
        run: PodRun,
        c: ContainerRun,
        startup: dict[str, Any] | None,
        readiness: dict[str, Any] | None,
    ) -> None:
        """The startup probe first (Ready waits for it), then the readiness probe, as the kubelet.

        A startup probe that has not succeeded within ``failureThreshold * periodSeconds``
        kills the container, which its restart policy then restarts.
        """
        if startup is not None:
            if not await self._startup(run, c, startup):
                grace = pod_spec_of(run.pod).get("terminationGracePeriodSeconds", 30)
                log.warning(
                    "%s/%s %s: startup probe failed; killing it", run.namespace, run.name, c.name
                )
                await self.supervisor.stop(c.process, grace_seconds=float(grace))
                return
            c.started = True
            c.ready = readiness is None
            await self._report(run)
        if readiness is not None:
            await self._probe(run, c, readiness)

    @staticmethod
    def _probe_url(run: PodRun, c: ContainerRun, probe: dict[str, Any]) -> str:
        http = probe.get("httpGet") or {}
        port = http.get("port")
        if isinstance(port, str):
            port = next(
                (p["containerPort"] for p in c.spec.get("ports") or [] if p.get("name") == port),
                None,
            )
        return f"http://{run.ip}:{port}{http.get('path', '/')}"

    @staticmethod
    async def _probe_once(session: aiohttp.ClientSession, url: str, probe: dict[str, Any]) -> bool:
        try:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=float(probe.get("timeoutSeconds", 1)) + 1)
            ) as resp:
                return 200 <= resp.status < 400
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _startup(self, run: PodRun, c: ContainerRun, probe: dict[str, Any]) -> bool:
        """Whether the startup probe succeeded within its budget (polled every 0.5 s at most)."""
        url = self._probe_url(run, c, probe)
        period = float(probe.get("periodSeconds", 10))
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        deadline = time.monotonic() + period * int(probe.get("failureThreshold", 3))
        async with aiohttp.ClientSession() as session:
            while True:
                if await self._probe_once(session, url, probe):
                    return True
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(min(period, 0.5))

    async def _probe(self, run: PodRun, c: ContainerRun, probe: dict[str, Any]) -> None:
        url = self._probe_url(run, c, probe)
        period = float(probe.get("periodSeconds", 10))
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        failures, success_needed = 0, int(probe.get("successThreshold", 1))
        successes = 0
        async with aiohttp.ClientSession() as session:
            while True:
                ok = await self._probe_once(session, url, probe)
                if ok:
                    successes, failures = successes + 1, 0
                    if not c.ready and successes >= success_needed:
                        c.ready = True
                        await self._report(run)
                else:
                    failures, successes = failures + 1, 0
                    if c.ready and failures >= int(probe.get("failureThreshold", 3)):
                        c.ready = False
                        await self._report(run)
                await asyncio.sleep(period if c.ready else min(period, 0.5))

    # --- status -----------------------------------------------------------------------------

    def _status(self, run: PodRun) -> dict[str, Any]:
        stamp = now_rfc3339()
        statuses = []
        for c in run.containers.values():
            status = {
                "name": c.name,
                "image": c.spec.get("image", ""),
                "imageID": "",
                "containerID": f"noderunner://{run.uid[:8]}-{c.name}-{c.restarts}",
                "ready": c.ready,
                "started": c.started and "running" in c.state,
                "restartCount": c.restarts,
                "state": c.state,
            }
            if c.last_state:
                status["lastState"] = c.last_state
            statuses.append(status)
        all_ready = bool(statuses) and all(s["ready"] for s in statuses) and run.phase == "Running"

        def cond(type_: str, ok: bool) -> dict[str, Any]:
            return {
                "type": type_,
                "status": "True" if ok else "False",
                "lastProbeTime": None,
                "lastTransitionTime": stamp,
            }

        status = {
            "phase": run.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.start_time,
            "conditions": [
                cond("PodScheduled", True),
                cond(
                    "Initialized", run.init_done or not pod_spec_of(run.pod).get("initContainers")
                ),
                cond("ContainersReady", all_ready),
                cond("Ready", all_ready),
            ],
            "containerStatuses": statuses,
        }
        if run.message and run.phase == "Failed":
            status["message"] = run.message
        return status

    async def _report(self, run: PodRun) -> None:
        status = self._status(run)
        comparable = json.loads(json.dumps(status))
        for cond in comparable["conditions"]:
            cond.pop("lastTransitionTime")
        if comparable == run.status_sent:
            return
        # Keep the lastTransitionTime of conditions whose status did not flip.
        old = {c["type"]: c for c in (run.pod.get("status") or {}).get("conditions") or []}
        for cond in status["conditions"]:
            prev = old.get(cond["type"])
            if prev and prev.get("status") == cond["status"] and prev.get("lastTransitionTime"):
                cond["lastTransitionTime"] = prev["lastTransitionTime"]
        try:
            patched = await self.client.patch(
                "v1", "Pod", run.namespace, run.name, {"status": status}, subresource="status"
            )
        except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
            log.warning(
                "status of %s/%s: %s (sent again at the next sync)", run.namespace, run.name, exc
            )
            run.report_failed = True
            return
        if patched is not None:
            run.pod = patched
        run.status_sent = comparable
        run.report_failed = False

    # --- stopping ---------------------------------------------------------------------------

    async def _terminate(self, run: PodRun, final_delete: bool = True) -> None:
        meta = run.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod_spec_of(run.pod).get("terminationGracePeriodSeconds", 30)
        if run.task is not None:
            run.task.cancel()
        names = [c.process for c in run.containers.values() if c.process]
        await asyncio.gather(*(self.supervisor.stop(n, grace_seconds=float(grace)) for n in names))
        for n in names:
            self.supervisor.forget(n)
        await self._remove_containers(run)
        for stash in STASH_ROOT.glob(f"{run.uid[:8]}-*"):
            shutil.rmtree(stash, ignore_errors=True)  # empty mount points, gone with the namespace
        if final_delete:
            await self._final_delete(run.pod)
        self.pods.pop(run.uid, None)

    async def _final_delete(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiError):
            await self.client.request(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                body={
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": meta["uid"]},
                },
                allow=(404, 409),
            )

    async def shutdown(self) -> None:
        for run in self.pods.values():
            if run.task is not None:
                run.task.cancel()
        await self.supervisor.stop_all(grace_seconds=5)
        for run in list(self.pods.values()):
            await self._remove_containers(run)


def local_image(reference: str) -> str:
    """The local build (``make images``) standing in for a pod's image reference.

    ``ghcr.io/kubetune/trainer:0.1.0``, ``REGISTRY/kubetune-server@sha256:...`` and the chart's
    ``ghcr.io/kubetune/operator:test`` map to ``localhost/kubetune/<name>:dev``.
    """
    name = reference.rsplit("/", 1)[-1].split("@")[0].split(":")[0].removeprefix("kubetune-")
    if name not in IMAGES:
        raise ValueError(f"image {reference!r}: no local kubetune image for it ({sorted(IMAGES)})")
    return image_ref(name)


def container_name(run: PodRun, container: str) -> str:
    return f"kt-{run.namespace}-{run.name}-{container}"[:200]


POD_NETWORK = "198.18.0.0/16"
# Empty mount points for paths a volume would hide (see _process_spec); /run is a tmpfs.
STASH_ROOT = Path("/run/kubetune-noderunner")


def make_pod_network_local() -> None:
    """Route the pod range to ``lo`` so any of its addresses can be bound (needs root)."""
    result = subprocess.run(
        ["ip", "route", "replace", "local", POD_NETWORK, "dev", "lo"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(
            f"noderunner: cannot make {POD_NETWORK} local ({result.stderr.strip()}); "
            "the cluster tier needs root (CAP_NET_ADMIN) for pod addresses"
        )


def _outermost(paths: list[str]) -> list[str]:
    """The paths none of which lies inside another (inner ones come along with their parent)."""
    out: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths}, key=len):
        if not any(path == o or path.startswith(o + "/") for o in out):
            out.append(path)
    return out


def build_shim(workdir: Path) -> Path:
    """Compile the bind shim (``shim/podip.c``) into ``workdir``; a C compiler is required."""
    out = workdir / "podip.so"
    source = Path(__file__).with_name("shim") / "podip.c"
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O2", "-o", str(out), str(source), "-ldl"], check=True
    )
    return out


async def amain(args: argparse.Namespace) -> None:
    client = KubeClient.from_kubeconfig(args.kubeconfig)
    nodes = [tuple(n.split(":", 1)) if ":" in n else (n, "cpu") for n in args.node]
    host, _, port = client.server.removeprefix("https://").partition(":")
    make_pod_network_local()
    runner = NodeRunner(
        client,
        Path(args.workdir),
        nodes,  # type: ignore[arg-type]
        host,
        int(port or 443),
        args.sync,
        shim=build_shim(Path(args.workdir)),
        subnet=args.subnet,
        images=args.images,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    try:
        await runner.run()
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--node", action="append", required=True, help="NAME[:cpu|gpu]")
    parser.add_argument("--sync", type=float, default=0.5)
    parser.add_argument("--subnet", type=int, default=0, help="first third octet of pod addresses")
    parser.add_argument(
        "--images",
        action="store_true",
        help="container mode: run pods in kubetune's images (make images) under podman",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
