"""The server image run with the serving Deployment's own pod spec (build_server_deployment).

Covers, as UID 10001 on a read-only root with every capability dropped, weights and adapter
fetched from moto's S3 with the pod's Secret-referenced keys:
- the official openai client's tests of tests/integration/test_server_api.py pass against the
  container (the same test functions, imported, with this module's ``server``): completions,
  chat, streaming, stop strings, seeded sampling, errors, probes, metrics;
- the server serves the artifact the trainer image published (tests/images/conftest.py);
- SIGTERM with a request in flight (seen queued in /metrics): /readyz turns 503, the request
  still completes, and the
  container exits 0 well within the pod's terminationGracePeriodSeconds, which is derived
  from requestTimeoutSeconds (it was a fixed 30 s against a 65 s drain).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kubetune.api.modeldeployment import ModelDeploymentSpec
from kubetune.rollout import builders as rb
from kubetune.rollout.revisions import Revision, resolve
from tests.images.conftest import SECRET, Pod, s3_client, upload_dir
from tests.integration.server_harness import free_port, train_adapter

# The openai-client tests of the integration tier, collected here again: they find this
# module's `server` and `client` fixtures, so they talk to the container.
from tests.integration.test_server_api import (  # noqa: F401
    CONFIG,
    MODEL,
    test_chat_completion_answers_the_task_with_the_adapter,
    test_completion_max_tokens_is_honoured_with_ignore_eos,
    test_completion_with_the_openai_client,
    test_metrics_parse_with_the_canary_analysis,
    test_models_lists_the_adapter_and_the_bare_base,
    test_openai_client_raises_bad_request_with_param,
    test_probes_report_alive_and_ready,
    test_seeded_sampling_is_reproducible_and_n_gives_several_choices,
    test_stop_string_cuts_the_text_and_is_not_included,
    test_streaming_chat_sends_role_first_then_deltas_and_usage,
    test_streaming_completion_concatenates_to_the_non_streamed_text,
    test_the_adapter_matters_tuned_answers_and_base_does_not,
    test_token_id_prompts_answer_like_their_text,
)
from tests.plugins.s3 import REGION

pytestmark = pytest.mark.images


def model_deployment(name: str, endpoint: str, base: str, adapter: str, **server: Any) -> dict:
    """A CPU ModelDeployment serving ``base`` + ``adapter`` from the moto bucket."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "images", "uid": "u-images"},
        "spec": {
            "model": {"baseModel": {"uri": base}, "adapter": {"uri": adapter}, "name": name},
            "replicas": 1,
            "resources": {"gpus": 0, "cpu": "1", "memory": "3Gi"},
            "storage": {"endpoint": endpoint, "region": REGION, "credentialsSecret": SECRET},
            "server": {**CONFIG, "port": free_port(), **server},
        },
    }


def gauge(metrics: str, name: str) -> float:
    """An unlabelled gauge's value from a /metrics text."""
    line = next(x for x in metrics.splitlines() if x.startswith(f"{name} "))
    return float(line.split()[-1])


class ServerPod:
    """The serving container of a revision's Deployment, and its URL on the host network."""

    def __init__(self, md: dict, image: str, scratch: Path) -> None:
        spec = ModelDeploymentSpec.model_validate(md["spec"])
        revision = resolve(spec, md["metadata"]["name"])
        assert isinstance(revision, Revision), revision
        self.deployment = rb.build_server_deployment(md, revision, role=rb.ROLE_STABLE, image=image)
        self.pod = Pod(self.deployment["spec"]["template"]["spec"], image, scratch)
        self.url = f"http://127.0.0.1:{spec.server.port}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.pod.running(), f"server exited:\n{self.pod.log()[-4000:]}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout:.0f} s:\n{self.pod.log()[-4000:]}")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text


@pytest.fixture(scope="module")
def server(built_images, s3_endpoint, tiny_base_model, tmp_path_factory):
    """The server image serving the tiny base and a LoRA adapter that learnt the task."""
    adapter = train_adapter(tiny_base_model, tmp_path_factory.mktemp("adapter") / "model")
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="images-serving")
    base_uri = upload_dir(client, tiny_base_model, "images-serving", "base")
    adapter_uri = upload_dir(client, adapter, "images-serving", "adapter")
    md = model_deployment(MODEL, s3_endpoint, base_uri, adapter_uri)
    srv = ServerPod(md, built_images["server"], tmp_path_factory.mktemp("server-pod"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.pod.cleanup()


@pytest.fixture
def client(server) -> openai.OpenAI:
    """The official OpenAI client pointed at the container."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_pod_runs_as_the_image_user_read_only_without_capabilities(server):
    args = server.pod.run.args
    assert "--read-only" in args and "--read-only-tmpfs=false" in args
    assert "--cap-drop=ALL" in args and "no-new-privileges" in args
    assert "--user" not in args  # runAsNonRoot with no runAsUser: the image's USER 10001
    # The emptyDirs are the only writable places; the server filled its download cache there.
    assert any(server.pod.volume("cache").rglob("*.safetensors"))


def test_serves_the_trainer_images_artifact_and_drains_on_sigterm(
    built_images, trained_artifact, image_assets, tmp_path
):
    md = model_deployment(
        "from-trainer",
        image_assets.endpoint,
        image_assets.base_uri,
        f"{trained_artifact.output_uri}/model",
        # Each request is held 2 s before generating (the fault-injection delay), where /metrics
        # counts it in flight: so the test knows it is in flight before sending SIGTERM. (A lone
        # request no longer waits batchWaitMs in the queue: 98176f2.)
        env=[{"name": "KUBETUNE_FAULT_LATENCY_MS", "value": "2000"}],
    )
    srv = ServerPod(md, built_images["server"], tmp_path / "pod")
    try:
        srv.wait_ready()
        grace = srv.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace == ModelDeploymentSpec.model_validate(md["spec"]).server.drain_seconds + 10
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
        models = {m.id for m in client.models.list().data}
        assert models == {"from-trainer", "from-trainer-base"}

        result: dict[str, Any] = {}

        def ask() -> None:
            try:
                result["response"] = client.completions.create(
                    model="from-trainer", prompt="Hello", max_tokens=4, temperature=0
                )
            except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
                result["error"] = exc

        thread = threading.Thread(target=ask)
        thread.start()
        deadline = time.monotonic() + 30
        while gauge(srv.metrics(), "kubetune_server_requests_in_flight") < 1:
            assert thread.is_alive() and time.monotonic() < deadline, (
                f"the request was never seen queued: {result}"
            )
            time.sleep(0.02)
        stopping = threading.Thread(target=lambda: result.setdefault("stop", srv.pod.stop()))
        stopping.start()
        deadline = time.monotonic() + 10
        while True:  # not ready from the moment SIGTERM arrives
            try:
                if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 503:
                    break
            except httpx.TransportError:
                break  # already gone: then the request below must have completed
            assert time.monotonic() < deadline, "/readyz never turned 503 after SIGTERM"
            time.sleep(0.05)
        thread.join(timeout=60)
        stopping.join(timeout=grace + 30)
        assert "error" not in result, result.get("error")
        assert result["response"].choices[0].text is not None
        code, seconds = result["stop"]
        assert code == 0, srv.pod.log()[-4000:]
        assert seconds < grace
    finally:
        srv.pod.cleanup()
