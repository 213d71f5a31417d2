"""Turn a container of a built pod template into a local process: command, environment, folders.

The builders in ``kubetune.finetune`` and ``kubetune.rollout`` produce the very Job and
Deployment manifests the operator submits to a cluster; this module reads the container out of
such a manifest and resolves it the way the kubelet would, with a few documented local
overrides (docs/local.md):

- ``command``/``args`` run as they are, except that ``python``/``python3`` become the running
  interpreter (``sys.executable``) and ``torchrun`` becomes ``python -m torch.distributed.run``,
  because the local machine has no container image with its own Python.
- ``env``: ``value`` as is; ``valueFrom.secretKeyRef`` from a Secret applied locally, else from
  the controller's own environment variable of the same key, else an error naming the Secret
  and key (unless ``optional``); ``valueFrom.fieldRef`` for the pod's metadata.
- every ``emptyDir`` volume becomes a folder of the process's run directory, and env values
  under its mountPath are rewritten to that folder (``/tmp/kubetune`` -> ``run/<p>/volumes/work``).
- the overrides a container cannot know: ``KUBETUNE_REPORT=file://...``,
  ``KUBETUNE_TERMINATION_LOG``, ``KUBETUNE_PORT`` (a free loopback port), ``OMP_NUM_THREADS``
  from the CPU limit so that two trainers do not fight over the same cores.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path
from typing import Any

from kubetune.local.processes import ProcessSpec

# Variables of the controller's environment a local process inherits: what a container image
# would bring itself (PATH, locale, a home for caches) and what makes Python find the packages.
_INHERITED = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "TZ",
)


class ContainerError(ValueError):
    """A container cannot be run locally (says which container and which field)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pod_spec_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The pod spec inside a Job, Deployment or Pod manifest."""
    kind = manifest.get("kind")
    if kind == "Pod":
        return manifest["spec"]
    try:
        return manifest["spec"]["template"]["spec"]
    except (KeyError, TypeError) as exc:
        name = manifest.get("metadata", {}).get("name")
        raise ContainerError(f"{kind} {name!r} has no spec.template.spec") from exc


def pod_metadata_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The pod template's metadata (labels, annotations), falling back to the object's."""
    if manifest.get("kind") == "Pod":
        return manifest.get("metadata", {})
    return (manifest.get("spec", {}).get("template", {}) or {}).get("metadata") or manifest.get(
        "metadata", {}
    )


def main_container(manifest: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The named container (regular or init, e.g. a podTemplate sidecar), or the first regular one."""
    spec = pod_spec_of(manifest)
    containers = spec.get("containers") or []
    if not containers:
        raise ContainerError(
            f"{manifest.get('kind')} {manifest.get('metadata', {}).get('name')!r} has no containers"
        )
    if name is None:
        return containers[0]
    # NB: sidecars of spec.podTemplate are initContainers (restartPolicy Always); a runtime
    # that starts them by name must find them there too.
    every = containers + (spec.get("initContainers") or [])
    for container in every:
        if container.get("name") == name:
            return container
    raise ContainerError(f"no container {name!r} in {[c.get('name') for c in every]}")


def local_argv(container: dict[str, Any]) -> list[str]:
    """The container's command + args with the interpreter swapped for the local one."""
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    if not argv:
        raise ContainerError(
            f"container {container.get('name')!r} sets no command: the local runtime cannot use an image's entrypoint"
        )
    head = os.path.basename(argv[0])
    if head in ("python", "python3") or head.startswith("python3."):
        argv[0] = sys.executable
    elif head == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return argv


def _cpu_threads(container: dict[str, Any]) -> int | None:
    resources = container.get("resources") or {}
    quantity = (resources.get("limits") or {}).get("cpu") or (resources.get("requests") or {}).get(
        "cpu"
    )
    if quantity is None:
        return None
    text = str(quantity)
    cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return max(1, min(os.cpu_count() or 1, math.ceil(cores)))


def resolve_env(
    container: dict[str, Any],
    pod_meta: dict[str, Any],
    secret_lookup: Any,
    where: str,
) -> dict[str, str]:
    """Resolve ``env`` like the kubelet: values, secretKeyRef, fieldRef.

    ``secret_lookup(name, key)`` returns the value or None. A missing secret falls back to the
    controller's environment variable named like the key, so ``AWS_ACCESS_KEY_ID`` exported in
    the shell is enough for a local run against S3.
    """
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = str(item["value"])
            continue
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = secret_lookup(ref.get("name"), ref["key"])
            if value is None:
                value = os.environ.get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise ContainerError(
                    f"{where}: env {name} needs key {ref['key']!r} of Secret {ref.get('name')!r}; "
                    f"apply a Secret manifest with `kubetune local apply -f` or export {ref['key']}"
                )
            env[name] = value
        elif "fieldRef" in source:
            path = source["fieldRef"].get("fieldPath", "")
            env[name] = _field_value(path, pod_meta)
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            value = os.environ.get(ref["key"])
            if value is None and not ref.get("optional"):
                raise ContainerError(
                    f"{where}: env {name} needs ConfigMap {ref.get('name')!r} key {ref['key']!r}; export {ref['key']}"
                )
            if value is not None:
                env[name] = value
        # resourceFieldRef and anything else: a container default is fine locally.
    return env


def _field_value(path: str, pod_meta: dict[str, Any]) -> str:
    if path == "metadata.name":
        return str(pod_meta.get("name", "local"))
    if path == "metadata.namespace":
        return str(pod_meta.get("namespace", "default"))
    if path.startswith("metadata.annotations['") and path.endswith("']"):
        key = path[len("metadata.annotations['") : -2]
        annotations = pod_meta.get("annotations") or {}
        # An Indexed Job gives every pod its completion index; the local runtime runs index 0.
        if key == "batch.kubernetes.io/job-completion-index":
            return str(annotations.get(key, "0"))
        return str(annotations.get(key, ""))
    if path.startswith("metadata.labels['") and path.endswith("']"):
        return str((pod_meta.get("labels") or {}).get(path[len("metadata.labels['") : -2], ""))
    if path in ("status.podIP", "status.hostIP"):
        return "127.0.0.1"
    if path == "spec.nodeName":
        return socket.gethostname()
    return ""


def container_port(container: dict[str, Any]) -> int | None:
    """The first declared containerPort."""
    for port in container.get("ports") or []:
        if "containerPort" in port:
            return int(port["containerPort"])
    return None


def to_process(
    manifest: dict[str, Any],
    process_name: str,
    run_dir: Path,
    cache_dir: Path,
    secret_lookup: Any,
    container_name: str | None = None,
    overrides: dict[str, str] | None = None,
) -> ProcessSpec:
    """The local process for one container of a built manifest.

    ``overrides`` are the runtime's own settings (report path, port, ...), applied last.
    """
    container = main_container(manifest, container_name)
    pod_meta = dict(pod_metadata_of(manifest))
    pod_meta.setdefault("name", f"{manifest.get('metadata', {}).get('name', 'pod')}-local")
    pod_meta.setdefault("namespace", manifest.get("metadata", {}).get("namespace", "default"))
    where = f"{manifest.get('kind')} {manifest.get('metadata', {}).get('name')!r} container {container.get('name')!r}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {k: os.environ[k] for k in _INHERITED if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(resolve_env(container, pod_meta, secret_lookup, where))

    # emptyDir volumes become folders; env values that point into them follow.
    volumes = {v["name"]: v for v in pod_spec_of(manifest).get("volumes") or []}
    mounts: list[tuple[str, Path]] = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"], {})
        if "emptyDir" in volume or not volume:
            local = cache_dir if "cache" in mount["name"] else run_dir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            mounts.append((mount["mountPath"].rstrip("/"), local))
    # Longest mount path first, so /cache/hf wins over /cache.
    mounts.sort(key=lambda m: len(m[0]), reverse=True)
    for key, value in list(env.items()):
        for mount_path, local in mounts:
            if value == mount_path or value.startswith(mount_path + "/"):
                env[key] = str(local) + value[len(mount_path) :]
                break

    threads = _cpu_threads(container)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.update(overrides or {})
    return ProcessSpec(
        name=process_name,
        argv=local_argv(container),
        env=env,
        cwd=str(run_dir),
        log_path=run_dir / "log.txt",
        labels=dict(pod_meta.get("labels") or {}),
    )
