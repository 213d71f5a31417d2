"""Daemonless podman for the images tier: settings, image names, and pod spec → ``podman run``.

One place says how this project drives podman (``make images`` builds with it, the tier and the
node runner's container mode run with it):

- ``podman --runtime runc``: crun refuses this kernel's hybrid cgroups;
- a containers.conf with ``default_ulimits = []`` and ``cgroup_manager = "cgroupfs"`` (no
  systemd here), pointed at by ``CONTAINERS_CONF``;
- images are named ``localhost/kubetune/<name>:dev`` (never pushed anywhere).

:func:`run_args` turns a Kubernetes pod spec (the dict a builder returns) into ``podman run``
arguments the way a kubelet would apply it: the container's command/args against the image's
entrypoint, its env (``value``, ``secretKeyRef`` from given Secrets, ``fieldRef`` of the pod),
its user (``runAsUser``/``runAsGroup`` when set, else the image's, refused when
``runAsNonRoot`` meets a root or non-numeric image user, as the kubelet does), a read-only root
filesystem, emptyDir volumes (memory-backed as tmpfs, others as fresh world-writable host
folders), the termination-message file, dropped/added capabilities, no privilege escalation,
the seccomp profile and the memory limit. Nothing is written by hand per test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(
    os.environ.get("KUBETUNE_IMAGES_CACHE", Path.home() / ".cache" / "kubetune" / "images")
)
CONTAINERS_CONF_TEXT = """\
# Written by tests/images/podman.py (make images): daemonless podman on the project's machines.
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
"""
TAG = "dev"
IMAGES = {
    # name: Dockerfile (built from the repository root)
    "trainer": "trainer-image/Dockerfile",
    "server": "server-image/Dockerfile",
    "operator": "operator-image/Dockerfile",
}


def image_ref(name: str) -> str:
    """``localhost/kubetune/<name>:dev``: what ``make images`` tags and the tier runs."""
    return f"localhost/kubetune/{name}:{TAG}"


def containers_conf() -> Path:
    """The containers.conf of this project's podman calls (written on first use)."""
    path = CACHE / "containers.conf"
    if not path.exists() or path.read_text() != CONTAINERS_CONF_TEXT:
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(CONTAINERS_CONF_TEXT)
    return path


def podman_env() -> dict[str, str]:
    """The environment of every podman call (``CONTAINERS_CONF`` set)."""
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf())}


def podman(*args: str, check: bool = True, capture: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Run ``podman --runtime runc ARGS`` with the project's containers.conf."""
    proc = subprocess.run(
        ["podman", "--runtime", "runc", *args],
        env=podman_env(),
        text=True,
        capture_output=capture,
        **kw,
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if capture else ""
        raise RuntimeError(f"podman {' '.join(args[:3])} ... exited {proc.returncode}: {detail}")
    return proc


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def image_config(ref: str) -> dict[str, Any]:
    """The image's OCI config (User, Entrypoint, Cmd, Env, ...)."""
    out = podman("image", "inspect", ref).stdout
    return json.loads(out)[0].get("Config") or {}


# --- pod spec → podman run --------------------------------------------------------------------


class PodSpecError(ValueError):
    """The pod spec asks for something a kubelet would refuse (the message says what)."""


@dataclass
class ContainerRun:
    """``podman run`` arguments for one container of a pod, plus the host side of its volumes."""

    args: list[str]
    volumes: dict[str, Path] = field(default_factory=dict)  # volume name → host folder
    termination_log: Path | None = None

    def termination_message(self) -> str:
        return self.termination_log.read_text() if self.termination_log else ""


_MEMORY_UNITS = {
    "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1,
}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``4Gi``, ``512M``, ``1000``) in bytes."""
    match = re.fullmatch(r"([0-9.]+)([KMGT]i?|k)?", str(quantity))
    if not match:
        raise PodSpecError(f"resources.limits.memory: {quantity!r} is not a quantity")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2) or ""])


def _env_args(
    container: Mapping[str, Any],
    secrets: Mapping[str, Mapping[str, str]],
    pod_fields: Mapping[str, str],
) -> list[str]:
    out: list[str] = []
    for i, item in enumerate(container.get("env") or []):
        where = f"containers[{container['name']}].env[{i}] ({item['name']})"
        if "value" in item:
            value = str(item["value"])
        elif "secretKeyRef" in (item.get("valueFrom") or {}):
            ref = item["valueFrom"]["secretKeyRef"]
            try:
                value = secrets[ref["name"]][ref["key"]]
            except KeyError:
                if ref.get("optional"):
                    continue  # the kubelet leaves an optional key that is absent unset
                raise PodSpecError(f"{where}: Secret {ref['name']}/{ref['key']} not given") from None
        elif "fieldRef" in (item.get("valueFrom") or {}):
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in pod_fields:
                raise PodSpecError(f"{where}: fieldRef {path} not given")
            value = pod_fields[path]
        else:
            raise PodSpecError(f"{where}: unsupported env source {sorted(item)}")
        out += ["--env", f"{item['name']}={value}"]
    return out


def _user_args(pod: Mapping[str, Any], container: Mapping[str, Any], image_user: str) -> list[str]:
    # Container-level settings win over pod-level ones (Kubernetes' merge rule).
    ctx = {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}
    uid, gid = ctx.get("runAsUser"), ctx.get("runAsGroup")
    if ctx.get("runAsNonRoot"):
        effective = uid if uid is not None else image_user.split(":")[0]
        # The kubelet's check: with no runAsUser it needs a numeric, non-zero image USER.
        if not str(effective).isdigit():
            raise PodSpecError(
                f"runAsNonRoot: the image's user {image_user!r} is not numeric, so the kubelet "
                "cannot verify it is non-root (CreateContainerConfigError)"
            )
        if int(effective) == 0:
            raise PodSpecError("runAsNonRoot: the container would run as root (UID 0)")
    if uid is None and gid is None:
        return []  # the image's USER applies, as in Kubernetes
    user = str(uid if uid is not None else image_user.split(":")[0] or 0)
    if gid is not None:
        user += f":{gid}"
    return ["--user", user]


def _security_args(pod: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    ctx = container.get("securityContext") or {}
    pod_ctx = pod.get("securityContext") or {}
    args: list[str] = []
    if ctx.get("privileged"):
        raise PodSpecError(f"containers[{container['name']}]: privileged containers are not run here")
    if ctx.get("readOnlyRootFilesystem"):
        # Writable places are exactly the pod's volumes: no tmpfs on /tmp, /run, /var/tmp.
        args += ["--read-only", "--read-only-tmpfs=false"]
    caps = ctx.get("capabilities") or {}
    args += [f"--cap-drop={c}" for c in caps.get("drop") or []]
    args += [f"--cap-add={c}" for c in caps.get("add") or []]
    if ctx.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif seccomp not in (None, "RuntimeDefault"):
        raise PodSpecError(f"seccompProfile {seccomp!r} is not supported here")
    return args


def _volume_args(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    scratch: Path,
    prepared: Mapping[str, Path],
) -> tuple[list[str], dict[str, Path]]:
    sources = {v["name"]: v for v in pod.get("volumes") or []}
    args: list[str] = []
    host: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        volume = sources.get(mount["name"])
        if volume is None:
            raise PodSpecError(f"volumeMounts {mount['name']!r}: no such volume in the pod")
        mode = "ro" if mount.get("readOnly") else "rw"
        if mount["name"] in prepared:
            # A folder the node filled already (Secret, ConfigMap, projected token, emptyDir).
            path = prepared[mount["name"]]
            if "emptyDir" in volume:
                path.chmod(0o777)
            host[mount["name"]] = path
            source = path / mount["subPath"] if mount.get("subPath") else path
            args += ["--volume", f"{source}:{mount['mountPath']}:{mode}"]
            continue
        if "emptyDir" not in volume:
            raise PodSpecError(f"volume {mount['name']!r}: only emptyDir volumes are run here")
        if (volume["emptyDir"] or {}).get("medium") == "Memory":
            limit = (volume["emptyDir"] or {}).get("sizeLimit")
            opts = "rw,mode=1777" + (f",size={memory_bytes(limit)}" if limit else "")
            args += ["--tmpfs", f"{mount['mountPath']}:{opts}"]
            continue
        # A kubelet emptyDir is a fresh world-writable folder on the node: the same here, so the
        # test can look at what the container left in it.
        path = host.get(mount["name"])
        if path is None:
            path = scratch / "volumes" / mount["name"]
            path.mkdir(parents=True)
            path.chmod(0o777)
            host[mount["name"]] = path
        args += ["--volume", f"{path}:{mount['mountPath']}:{mode}"]
    return args, host


def run_args(
    pod: Mapping[str, Any],
    *,
    image: str,
    container_name: str | None = None,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
    pod_fields: Mapping[str, str] | None = None,
    scratch: Path | None = None,
    name: str | None = None,
    node_env: Mapping[str, str] | None = None,
    node_files: Mapping[Path, str] | None = None,
    config: Mapping[str, Any] | None = None,
    volume_dirs: Mapping[str, Path] | None = None,
    termination_log: Path | None = None,
) -> ContainerRun:
    """``podman run`` arguments (after ``run``) running one container of ``pod`` as a kubelet would.

    ``pod`` is a pod spec (``Job.spec.template.spec``); ``image`` replaces the container's image
    (the test's local build); ``secrets`` maps Secret name → data for ``secretKeyRef``;
    ``pod_fields`` maps ``fieldRef`` paths (``metadata.name``) to values; ``scratch`` is where
    emptyDir folders and the termination-message file are created. The network is the host's
    (the tier's S3 server listens on loopback). ``node_env`` and ``node_files`` (host file →
    read-only container path) are what a node adds to every pod on its own, in place of the
    kubelet's service-account token and ``KUBERNETES_SERVICE_HOST``: a kubeconfig, say.
    ``config`` is the image's OCI config (read with ``podman image inspect`` when not given).
    ``volume_dirs`` maps volume names to folders a node prepared already (the node runner's
    Secrets, ConfigMaps and tokens); ``termination_log`` is the host file of the termination
    message (default: a new one under ``scratch``).
    """
    containers = {c["name"]: c for c in pod["containers"]}
    container = containers[container_name] if container_name else pod["containers"][0]
    scratch = Path(scratch or tempfile.mkdtemp(prefix="kt-pod-"))
    config = image_config(image) if config is None else config
    args = ["--rm", "--network", "host", "--pull", "never"]
    if name:
        args += ["--name", name]
    args += _user_args(pod, container, config.get("User") or "")
    args += _security_args(pod, container)
    limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if limit:
        args += ["--memory", str(memory_bytes(limit))]
    volume_args, host = _volume_args(pod, container, scratch, volume_dirs or {})
    args += volume_args
    if container.get("terminationMessagePath") or termination_log:
        termination_log = termination_log or scratch / "termination-log"
        termination_log.write_text("")  # a restarted container starts with an empty message
        termination_log.chmod(0o666)
        path = container.get("terminationMessagePath") or "/dev/termination-log"
        args += ["--volume", f"{termination_log}:{path}:rw"]
    for host_path, container_path in (node_files or {}).items():
        args += ["--volume", f"{host_path}:{container_path}:ro"]
    args += [a for k, v in (node_env or {}).items() for a in ("--env", f"{k}={v}")]
    args += _env_args(container, secrets or {}, pod_fields or {})
    # Kubernetes: `command` replaces the image's ENTRYPOINT (and drops its CMD), `args` the CMD.
    command: Sequence[str] | None = container.get("command")
    if command:
        args += ["--entrypoint", json.dumps(list(command))]
    args.append(image)
    # NB: podman, like the kubelet, drops the image's CMD once the entrypoint is replaced.
    args += [str(a) for a in container.get("args") or []]
    return ContainerRun(args=args, volumes=host, termination_log=termination_log)
