"""Fixtures of the images tier: the built images, containers run like pods, assets in moto's S3.

- ``built_images`` (session): ``built_images["trainer"]`` is the image ``make images`` tagged;
  a test whose image is missing fails (it does not skip), saying to run ``make images``.
- :class:`Pod`: one container of a builder's pod spec run with ``podman run`` through
  :func:`tests.images.podman.run_args` (never hand-written arguments); ``stop()`` is the
  kubelet's SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``.
- ``image_assets`` (session): the tiny base model and the synthetic dataset in a moto bucket,
  plus the Secret with the bucket's keys that the pods' ``secretKeyRef`` env resolves from.
- ``trained_artifact`` (session): the trainer image's ``validate`` and ``train`` run once on
  those assets; the trainer tests check it and the server tests serve it.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from kubetune.finetune import builders as ftb
from kubetune.local.demo import DemoSettings, finetunejob
from tests.images.podman import IMAGES, image_exists, image_ref, podman, podman_env, run_args
from tests.plugins.s3 import REGION

SECRET = "s3-keys"
SECRETS = {SECRET: {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}}
BUCKET = "images-tier"


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def upload_dir(client: Any, folder: Path, bucket: str, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")
    return f"s3://{bucket}/{prefix}"


class BuiltImages(dict):
    """name → image reference; looking up an image that was not built fails the test clearly."""

    def __missing__(self, name: str) -> str:
        raise KeyError(name)

    def __getitem__(self, name: str) -> str:
        ref = image_ref(name)
        if not image_exists(ref):
            pytest.fail(f"image {ref} not built; run `make images` (docs/images.md)")
        return ref


@pytest.fixture(scope="session")
def built_images() -> BuiltImages:
    """The images ``make images`` built (the tier fails, never skips, when one is missing)."""
    assert set(IMAGES) == {"trainer", "server", "operator"}
    return BuiltImages()


class Pod:
    """One container of a pod spec, running under podman as the kubelet would run it."""

    def __init__(
        self,
        pod_spec: dict[str, Any],
        image: str,
        scratch: Path,
        *,
        container: str | None = None,
        pod_fields: dict[str, str] | None = None,
        node_env: dict[str, str] | None = None,
        node_files: dict[Path, str] | None = None,
    ) -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        self.pod_spec = pod_spec
        self.name = f"kt-{uuid.uuid4().hex[:10]}"
        self.run = run_args(
            pod_spec,
            image=image,
            container_name=container,
            secrets=SECRETS,
            pod_fields=pod_fields,
            scratch=scratch,
            name=self.name,
            node_env=node_env,
            node_files=node_files,
        )
        self.log_path = scratch / "container.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in wait())
        self.proc = subprocess.Popen(
            ["podman", "--runtime", "runc", "run", *self.run.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=podman_env(),
        )
        self.exit_code: int | None = None

    @property
    def grace_seconds(self) -> int:
        return int(self.pod_spec.get("terminationGracePeriodSeconds", 30))

    def volume(self, name: str) -> Path:
        """The host folder of one of the pod's emptyDir volumes."""
        return self.run.volumes[name]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def termination_message(self) -> dict[str, Any]:
        text = self.run.termination_message()
        return json.loads(text) if text.strip() else {}

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """The container's exit code; fails the test (after killing it) past ``timeout``."""
        try:
            self.exit_code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            podman("kill", "--signal", "KILL", self.name, check=False)
            self.proc.wait(timeout=60)
            raise AssertionError(f"container still running after {timeout:.0f} s:\n{self.log()[-4000:]}") from None
        finally:
            self._log.close()
        return self.exit_code

    def stop(self) -> tuple[int, float]:
        """The kubelet's stop: SIGTERM, SIGKILL after the grace period; (exit code, seconds)."""
        started = time.monotonic()
        podman("kill", "--signal", "TERM", self.name)
        try:
            self.exit_code = self.proc.wait(timeout=self.grace_seconds)
        except subprocess.TimeoutExpired:
            podman("kill", "--signal", "KILL", self.name, check=False)
            self.exit_code = self.proc.wait(timeout=60)
        finally:
            self._log.close()
        return self.exit_code, time.monotonic() - started

    def cleanup(self) -> None:
        if self.running():
            podman("kill", "--signal", "KILL", self.name, check=False)
            self.proc.wait(timeout=60)
        if not self._log.closed:
            self._log.close()


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    """Pods a test starts (append them): any still running at the end are killed."""
    started: list[Pod] = []
    yield started
    for pod in started:
        pod.cleanup()


@dataclass
class Assets:
    endpoint: str
    bucket: str
    base_uri: str
    train_uri: str
    base_dir: Path


@pytest.fixture(scope="session")
def image_assets(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """The tiny base model and the demo dataset, uploaded to a moto bucket."""
    from kubetune.local.demo import prepare

    work = tmp_path_factory.mktemp("image-assets")
    paths = prepare(work, DemoSettings.fast(), say=lambda _text: None)
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    base_uri = upload_dir(client, paths["base"], BUCKET, "models/base")
    client.upload_file(str(paths["train"]), BUCKET, "data/train.jsonl")
    return Assets(
        endpoint=s3_endpoint,
        bucket=BUCKET,
        base_uri=base_uri,
        train_uri=f"s3://{BUCKET}/data/train.jsonl",
        base_dir=paths["base"],
    )


def image_finetunejob(name: str, assets: Assets, steps: int, **spec: Any) -> dict[str, Any]:
    """The demo's CPU-sized LoRA FineTuneJob, reading and writing the moto bucket."""
    # The demo's spec with file:// URIs, which the lines below point at the bucket instead.
    paths = {"base": assets.base_dir, "train": assets.base_dir}
    ftj = finetunejob(name, assets.base_dir, paths, steps=steps, settings=DemoSettings.fast(), seed=1)
    ftj["metadata"]["namespace"] = "images"
    ftj["spec"]["baseModel"] = {"uri": assets.base_uri}
    ftj["spec"]["dataset"]["train"] = assets.train_uri
    ftj["spec"]["output"] = {"uri": f"s3://{assets.bucket}/runs/{name}"}
    ftj["spec"]["storage"] = {
        "endpoint": assets.endpoint,
        "region": REGION,
        "credentialsSecret": SECRET,
    }
    ftj["spec"].update(spec)
    return ftj


@dataclass
class TrainedArtifact:
    ftj: dict[str, Any]
    validate: Pod
    train: Pod
    output_uri: str


@pytest.fixture(scope="session")
def trained_artifact(
    built_images: dict[str, str], image_assets: Assets, tmp_path_factory: pytest.TempPathFactory
) -> TrainedArtifact:
    """``validate`` then ``train`` in the trainer image, with the Jobs' own pod specs."""
    ftj = image_finetunejob("tiny", image_assets, steps=8, checkpoint={"everySteps": 4, "keepLast": 2})
    scratch = tmp_path_factory.mktemp("trainer")
    image = built_images["trainer"]
    validate = Pod(
        ftb.build_validate_job(ftj, image=image, report="none")["spec"]["template"]["spec"],
        image,
        scratch / "validate",
    )
    validate.wait(timeout=300)
    train = Pod(
        ftb.build_train_job(ftj, attempt=0, image=image, report="none")["spec"]["template"]["spec"],
        image,
        scratch / "train",
    )
    train.wait(timeout=600)
    return TrainedArtifact(ftj=ftj, validate=validate, train=train, output_uri=ftj["spec"]["output"]["uri"])
