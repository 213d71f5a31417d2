"""``make images``: build the three images from the repository's Dockerfiles with daemonless podman.

    python -m tests.images.build [trainer|server|operator ...]

1. Installs podman, runc and debootstrap with apt-get when they are missing (CI starts bare).
2. A local base image, because no registry is reachable: ``debootstrap --variant=minbase`` of
   Debian bookworm with python3 (what ``python:3.11-slim-bookworm`` provides), imported with
   ``podman import``; built once per machine, named after a hash of the pinned recipe.
3. ``podman build`` of each Dockerfile with that base passed through its base-image ``ARG``
   (``CUDA_IMAGE``, ``PYTHON_IMAGE``); everything else is the file a platform team builds with
   Docker. ``--network host`` reaches Debian's and PyPI's servers; the machine's CA bundle
   (pip's ``cert``) is mounted read-only and named by ``PIP_CERT`` (never in a layer).
   Layers are reused between runs: a source change rebuilds only the last layers.
4. Torch and the other wheels download once per machine: ``pip download`` fills a wheelhouse
   (``~/.cache/kubetune/images/wheels``) that is mounted into the builds and named by
   ``PIP_FIND_LINKS`` with ``PIP_NO_INDEX=1``, so the builds install from it alone. (pip's
   own HTTP cache does not work on these machines: the proxy's answers are not cacheable, so
   a mounted pip cache stays empty.)

Prints the build time and size of each image and writes them to
``.kubetune/test-artifacts/images-build.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from tests.images.podman import CACHE, IMAGES, REPO, image_exists, image_ref, podman, podman_env

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}  # command: package
ARTIFACTS = REPO / ".kubetune" / "test-artifacts"
WHEELS = CACHE / "wheels"
# Installed by a Dockerfile on top of the extras (trainer-image: bitsandbytes for qlora).
EXTRA = ("bitsandbytes>=0.43",)


def log(message: str) -> None:
    print(f"[images] {message}", flush=True)


def ensure_tools() -> None:
    """apt-get install whatever of podman, runc and debootstrap is missing."""
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, "uidmap"],
        check=True,
        env=env,
    )


def base_ref() -> str:
    """The local base image's name: a hash of the recipe, so a changed recipe builds anew."""
    recipe = json.dumps([SUITE, "minbase", MIRROR, BASE_PACKAGES])
    return f"localhost/kubetune/base:{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def ensure_base() -> str:
    ref = base_ref()
    if image_exists(ref):
        return ref
    log(f"building the base image {ref} (debootstrap, a few minutes once per machine)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            [
                "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                SUITE, str(rootfs), MIRROR,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # Nothing of the machine's apt cache in the base.
        for deb in (rootfs / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            deb.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "--runtime", "runc", "import", "-", ref],
            stdin=tar.stdout,
            check=True,
            env=podman_env(),
            stdout=subprocess.DEVNULL,
        )
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap root failed")
    return ref


def ca_bundle() -> str | None:
    """The CA bundle pip uses on this machine (``PIP_CERT``, pip's ``cert`` setting, Debian's)."""
    if os.environ.get("PIP_CERT"):
        return os.environ["PIP_CERT"]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"],
        capture_output=True, text=True,
    )
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.strip()
    default = "/etc/ssl/certs/ca-certificates.crt"
    return default if Path(default).exists() else None


def requirements() -> list[str]:
    """What the Dockerfiles install: dependencies, extras, EXTRA and the build backend."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    return sorted({*project["dependencies"], *extras["train"], *extras["serve"], *EXTRA, *build})


def fill_wheelhouse() -> Path:
    """``pip download`` every requirement into the wheelhouse, unless it holds them already."""
    wanted = "\n".join(requirements()) + "\n"
    stamp = WHEELS / ".requirements.txt"
    if stamp.exists() and stamp.read_text() == wanted:
        return WHEELS
    log("downloading the wheels into the wheelhouse (once per machine)")
    WHEELS.mkdir(parents=True, exist_ok=True)
    listing = WHEELS / ".wanted.txt"
    listing.write_text(wanted)
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--dest", str(WHEELS), "-r", str(listing)],
        check=True,
        env=env,
    )
    listing.rename(stamp)
    return WHEELS


# What goes into every image besides its Dockerfile (the build context the Dockerfiles COPY).
SOURCES = (
    ".dockerignore", "pyproject.toml", "README.md",
    "operator", "trainer-image/kubetune_trainer", "server-image/kubetune_server",
)
INPUTS_LABEL = "io.kubetune.inputs"


def inputs_digest(name: str, base: str) -> str:
    """A hash of everything the build of ``name`` reads: its Dockerfile, the sources it copies,
    the base image, the wheelhouse's requirement list and the pip settings passed in."""
    digest = hashlib.sha256()
    settings = {k: os.environ.get(k, "") for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "TORCH_INDEX_URL")}
    digest.update(json.dumps([name, base, requirements(), settings]).encode())
    files: list[Path] = [REPO / IMAGES[name]]
    for source in SOURCES:
        path = REPO / source
        files += sorted(path.rglob("*")) if path.is_dir() else [path]
    for path in files:
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


_LAYER = re.compile(r"^--> (?:Using cache )?([0-9a-f]{12,64})\s*$")


def run_build(args: list[str]) -> set[str]:
    """``podman build ARGS``, its output passed through; returns the ids of the layers it used
    or made (the build cache of this image, which ``prune_superseded`` keeps)."""
    proc = subprocess.Popen(
        ["podman", "--runtime", "runc", *args],
        env=podman_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    layers: set[str] = set()
    tail: list[str] = []
    for line in proc.stdout:
        sys.stdout.write(line)
        tail = (tail + [line])[-20:]
        match = _LAYER.match(line.strip())
        if match:
            layers.add(match.group(1))
    if proc.wait() != 0:
        raise RuntimeError(f"podman build exited {proc.returncode}: {''.join(tail)[-2000:]}")
    return layers


def prune_superseded() -> None:
    """Remove the untagged layers of superseded builds, keeping every image's last build cache.

    With ``--layers`` each build step leaves an untagged image; a dependency change leaves the old
    multi-GB ones behind, and a few such changes filled this machine's disk (podman then failed
    mid-build: "storing layer ... read/write on closed pipe"). Kept: the layers each image's last
    build used or made (``layers-<name>.json``). Nothing is removed until every image has one.
    """
    keep: set[str] = set()
    for name in IMAGES:
        record = CACHE / f"layers-{name}.json"
        if not record.exists():
            return
        keep |= set(json.loads(record.read_text()))
    dangling = podman("images", "--filter", "dangling=true", "--quiet", "--no-trunc").stdout.split()
    stale = [
        image.removeprefix("sha256:")
        for image in dangling
        if not any(image.removeprefix("sha256:").startswith(k) for k in keep)
    ]
    if stale:
        # An image still a parent of a kept one refuses removal: that is fine, it stays.
        for image in stale:
            podman("rmi", image, check=False)
        log(f"pruned up to {len(stale)} layers of superseded builds")


def build(name: str, base: str) -> dict:
    inputs = inputs_digest(name, base)
    if image_exists(image_ref(name)):
        labels = podman("image", "inspect", "--format", "{{json .Labels}}", image_ref(name)).stdout
        if (json.loads(labels) or {}).get(INPUTS_LABEL) == inputs:
            # Nothing it reads has changed: even a fully cached podman build re-hashes the
            # multi-GB virtualenv layer for minutes, so skip it.
            log(f"{image_ref(name)} is up to date (inputs {inputs})")
            return {"image": image_ref(name), "seconds": 0.0, "reused": True, "inputs": inputs}
    args = [
        "build", "--network", "host", "--layers", "--pull=never",
        "-f", str(REPO / IMAGES[name]), "-t", image_ref(name), "--label", f"{INPUTS_LABEL}={inputs}",
        "--build-arg", f"CUDA_IMAGE={base}", "--build-arg", f"PYTHON_IMAGE={base}",
        "--volume", f"{WHEELS}:/run/kubetune-wheels:ro",
        "--build-arg", "PIP_FIND_LINKS=/run/kubetune-wheels",
    ]
    if not os.environ.get("TORCH_INDEX_URL"):
        # Only the wheelhouse: with an index too, pip downloads what the wheelhouse holds.
        args += ["--build-arg", "PIP_NO_INDEX=1"]
    cert = ca_bundle()
    if cert:
        args += ["--volume", f"{cert}:/run/kubetune-ca.crt:ro", "--build-arg", "PIP_CERT=/run/kubetune-ca.crt"]
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "TORCH_INDEX_URL"):
        if os.environ.get(key):
            args += ["--build-arg", f"{key}={os.environ[key]}"]
    args.append(str(REPO))
    log(f"building {image_ref(name)} from {IMAGES[name]}")
    started = time.monotonic()
    layers = run_build(args)
    (CACHE / f"layers-{name}.json").write_text(json.dumps(sorted(layers)) + "\n")
    seconds = time.monotonic() - started
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image_ref(name)).stdout.strip())
    log(f"{image_ref(name)}: {seconds:.0f} s, {size / 1e9:.2f} GB")
    return {"image": image_ref(name), "seconds": round(seconds, 1), "bytes": size, "inputs": inputs}


def main(argv: list[str]) -> int:
    names = argv or list(IMAGES)
    unknown = [n for n in names if n not in IMAGES]
    if unknown:
        print(f"unknown image(s) {unknown}; choose from {list(IMAGES)}", file=sys.stderr)
        return 2
    ensure_tools()
    started = time.monotonic()
    base = ensure_base()
    fill_wheelhouse()
    results = {"base": {"image": base, "seconds": round(time.monotonic() - started, 1)}}
    for name in names:
        results[name] = build(name, base)
    prune_superseded()
    results["total_seconds"] = round(time.monotonic() - started, 1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "images-build.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"done in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
