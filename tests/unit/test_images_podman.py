"""tests/images/podman.py: a pod spec becomes ``podman run`` arguments the way a kubelet applies it.

Covers, on the builders' own pod specs (no podman needed): the command replaces the image's
entrypoint, env values and Secret references (optional keys left out), the image's USER when
the pod fixes none, the kubelet's runAsNonRoot refusal of a root or non-numeric image user, a
read-only root with no implicit tmpfs, emptyDirs as fresh world-writable folders or tmpfs,
the termination-message file, dropped capabilities, no privilege escalation, memory limits.
"""

from __future__ import annotations

import json

import pytest

from kubetune.finetune import builders as ftb
from tests.images.podman import PodSpecError, memory_bytes, run_args
from tests.unit.test_finetune_builders import make_ftj

SECRETS = {"s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"}}
IMAGE = {"User": "10001:10001", "Entrypoint": ["python", "-m", "kubetune_trainer"], "Cmd": ["train"]}


def _validate_pod() -> dict:
    ftj = make_ftj(storage={"endpoint": "http://127.0.0.1:9", "credentialsSecret": "s3"})
    return ftb.build_validate_job(ftj, image="x", report="none")["spec"]["template"]["spec"]


def _args(pod, tmp_path, config=IMAGE, **kw):
    return run_args(pod, image="img", secrets=SECRETS, scratch=tmp_path, config=config, **kw)


def test_validate_jobs_pod_becomes_a_restricted_podman_run(tmp_path):
    run = _args(_validate_pod(), tmp_path)
    args = run.args
    assert args[args.index("--entrypoint") + 1] == json.dumps(
        ["python", "-m", "kubetune_trainer", "validate"]
    )
    assert args[-1] == "img"  # no args: the image's CMD ("train") is dropped
    assert "--user" not in args  # runAsNonRoot and no runAsUser: the image's 10001 applies
    assert {"--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL"} <= set(args)
    assert args[args.index("no-new-privileges") - 1] == "--security-opt"
    assert args[args.index("--memory") + 1] == str(4 << 30)
    env = [args[i + 1] for i, a in enumerate(args) if a == "--env"]
    assert "AWS_ACCESS_KEY_ID=id" in env and "AWS_SECRET_ACCESS_KEY=key" in env
    assert not any(e.startswith("AWS_SESSION_TOKEN=") for e in env)  # optional, absent
    mounts = [args[i + 1] for i, a in enumerate(args) if a == "--volume"]
    assert f"{run.volumes['tmp']}:/tmp:rw" in mounts and f"{run.volumes['cache']}:/cache:rw" in mounts
    assert oct(run.volumes["tmp"].stat().st_mode & 0o777) == "0o777"
    assert f"{run.termination_log}:/dev/termination-log:rw" in mounts


@pytest.mark.parametrize(
    ("image_user", "message"),
    [("", "not numeric"), ("root", "not numeric"), ("0", "UID 0"), ("0:0", "UID 0")],
)
def test_run_as_non_root_refuses_a_root_image_as_the_kubelet_does(tmp_path, image_user, message):
    with pytest.raises(PodSpecError, match=message):
        _args(_validate_pod(), tmp_path, config={**IMAGE, "User": image_user})


def test_a_fixed_uid_is_passed_and_wins_over_the_image_user(tmp_path):
    pod = _validate_pod()
    pod["securityContext"] = {**pod["securityContext"], "runAsUser": 2000, "runAsGroup": 3000}
    args = _args(pod, tmp_path, config={**IMAGE, "User": "root"}).args
    assert args[args.index("--user") + 1] == "2000:3000"


def test_memory_emptydir_is_a_sized_tmpfs_and_a_missing_secret_is_named(tmp_path):
    ftj = make_ftj(resources={"gpus": 2})
    pod = ftb.build_train_job(ftj, attempt=0, image="x", report="none")["spec"]["template"]["spec"]
    pod["volumes"] = [
        {**v, "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} if v["name"] == "dshm" else v
        for v in pod["volumes"]
    ]
    args = _args(pod, tmp_path).args
    assert args[args.index("--tmpfs") + 1] == f"/dev/shm:rw,mode=1777,size={1 << 30}"
    pod["containers"][0]["env"].append(
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}
    )
    with pytest.raises(PodSpecError, match=r"env\[\d+\] \(X\): Secret nope/k not given"):
        _args(pod, tmp_path / "again")


@pytest.mark.parametrize(("quantity", "expected"), [("4Gi", 4 << 30), ("512M", 512 * 10**6), ("1000", 1000)])
def test_memory_quantities(quantity, expected):
    assert memory_bytes(quantity) == expected


@pytest.mark.parametrize(
    ("reference", "local"),
    [
        ("ghcr.io/kubetune/trainer:0.1.0", "localhost/kubetune/trainer:dev"),
        ("ghcr.io/kubetune/operator:test", "localhost/kubetune/operator:dev"),
        ("registry.example/team/kubetune-server@sha256:ab", "localhost/kubetune/server:dev"),
    ],
)
def test_node_runner_container_mode_runs_the_local_build_of_a_pods_image(reference, local):
    from tests.cluster.noderunner import local_image

    assert local_image(reference) == local


def test_node_runner_container_mode_names_an_image_it_has_no_build_for():
    from tests.cluster.noderunner import local_image

    with pytest.raises(ValueError, match="busybox"):
        local_image("docker.io/library/busybox:1")
