"""The vLLM engine's fetch init container (``python -m kubetune_server.fetch``) against real S3.

Aspects covered (moto's S3 server on loopback; the init container's environment exactly as
``build_server_deployment`` writes it for a ``server.engine: vllm`` revision, its Secret keys
from the test's S3 environment):

- the base model and the adapter are downloaded, verified against their manifests and laid
  out where the built ``vllm serve`` arguments point (model folder, ``--lora-modules``
  folders, a served name with '/' included); fetched.json records the adapter digest;
- a corrupted artifact (a file changed after its manifest) is refused: exit 1, the termination
  log names the URI and the file;
- an adapter whose LoRA rank exceeds what vLLM will reserve is refused with the flag to set;
- a restarted init container (the folder already filled) succeeds again, reusing the cache;
- a missing KUBETUNE_FETCH_DIR is a configuration error (exit 2).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.api.modeldeployment import ModelDeploymentSpec
from kubetune.rollout import builders as b
from kubetune.rollout.revisions import Revision, resolve
from kubetune.storage import open_store
from kubetune.storage.manifests import manifest_digest
from tests.integration.server_harness import random_adapter


@pytest.fixture(scope="module")
def adapter(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA adapter of the tiny model, with its manifest."""
    return random_adapter(tiny_base_model, tmp_path_factory.mktemp("adapter") / "ad", seed=3)


def _mdep(s3_endpoint: str, bucket: str, name: str = "support/bot") -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": "default"},
        "spec": {
            "model": {
                "baseModel": {"uri": f"s3://{bucket}/base"},
                "adapter": {"uri": f"s3://{bucket}/adapter"},
                "name": name,
            },
            "storage": {
                "endpoint": s3_endpoint,
                "region": "us-east-1",
                "credentialsSecret": "s3-creds",
            },
            "server": {"engine": "vllm"},
        },
    }


def _fetch_container(md: dict) -> tuple[dict, Revision]:
    rev = resolve(ModelDeploymentSpec.model_validate(md["spec"]), "chat", None)
    assert isinstance(rev, Revision)
    dep = b.build_server_deployment(md, rev, role=b.ROLE_STABLE)
    return dep, rev


def _run(container: dict, s3_env: dict, root: Path, tmp_path: Path, **override: str):
    """Run the init container's command as a process, as the kubelet would (env resolved)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "LANG")}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:  # secretKeyRef: the Secret holds the test's S3 keys
            env[item["name"]] = s3_env[item["valueFrom"]["secretKeyRef"]["key"]]
    env.update(
        KUBETUNE_FETCH_DIR=str(root),
        KUBETUNE_TERMINATION_LOG=str(tmp_path / "termination-log"),
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(override)
    for key in [k for k, v in env.items() if v is None]:
        del env[key]
    argv = [sys.executable if container["command"][0] == "python" else container["command"][0]]
    argv += container["command"][1:]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def _upload(tiny_base_model: Path, adapter: Path, bucket: str) -> None:
    open_store(f"s3://{bucket}/base").upload_dir(tiny_base_model)
    open_store(f"s3://{bucket}/adapter").upload_dir(adapter)


def test_fetch_lays_out_what_vllm_is_told_to_serve(
    tiny_base_model, adapter, s3_endpoint, s3_bucket, s3_env, tmp_path
):
    _upload(tiny_base_model, adapter, s3_bucket)
    md = _mdep(s3_endpoint, s3_bucket)
    dep, rev = _fetch_container(md)
    spec = dep["spec"]["template"]["spec"]
    (fetch,) = spec["initContainers"]
    root = tmp_path / "models"
    done = _run(fetch, s3_env, root, tmp_path)
    assert done.returncode == 0, done.stderr

    args = spec["containers"][0]["args"]

    def local(path: str) -> Path:
        # The engine sees the emptyDir at MODELS_DIR; here it is `root`.
        assert path.startswith(b.MODELS_DIR + "/")
        return root / path[len(b.MODELS_DIR) + 1 :]

    model = local(args[0])
    assert (model / "config.json").read_bytes() == (tiny_base_model / "config.json").read_bytes()
    (module,) = args[args.index("--lora-modules") + 1 :][:1]
    served, path = module.split("=", 1)
    assert served == "support/bot" == rev.model_name
    folder = local(path)
    assert folder.name == "support%2Fbot"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    assert (folder / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    record = json.loads((root / "fetched.json").read_text())
    digest = manifest_digest(json.loads((adapter / "manifest.json").read_text()))
    assert record["adapterDigest"] == digest
    assert record["adapters"]["support/bot"]["uri"] == f"s3://{s3_bucket}/adapter"

    # The kubelet restarts a failed pod's init containers: a second run over the filled folder
    # succeeds and lands on the same folders.
    again = _run(fetch, s3_env, root, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (local(args[0]) / "config.json").is_file() and folder.resolve().is_dir()


def test_a_corrupted_adapter_is_refused(
    tiny_base_model, adapter, s3_endpoint, s3_bucket, s3_env, tmp_path
):
    _upload(tiny_base_model, adapter, s3_bucket)
    store = open_store(f"s3://{s3_bucket}/adapter")
    store.write_bytes("adapter_config.json", b'{"r": 4, "tampered": true}')
    dep, _ = _fetch_container(_mdep(s3_endpoint, s3_bucket))
    (fetch,) = dep["spec"]["template"]["spec"]["initContainers"]
    done = _run(fetch, s3_env, tmp_path / "models", tmp_path)
    assert done.returncode == 1
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["outcome"] == "storage_error"
    assert f"s3://{s3_bucket}/adapter" in message["message"]
    assert "adapter_config.json" in message["message"]
    assert not (tmp_path / "models" / "model").exists()


def test_an_adapter_above_the_reserved_rank_is_refused_with_the_flag_to_set(
    tiny_base_model, adapter, s3_endpoint, s3_bucket, s3_env, tmp_path
):
    _upload(tiny_base_model, adapter, s3_bucket)
    md = copy.deepcopy(_mdep(s3_endpoint, s3_bucket))
    md["spec"]["server"]["vllm"] = {"maxLoraRank": 1}
    dep, _ = _fetch_container(md)
    (fetch,) = dep["spec"]["template"]["spec"]["initContainers"]
    assert {"name": "KUBETUNE_MAX_LORA_RANK", "value": "1"} in fetch["env"]
    done = _run(fetch, s3_env, tmp_path / "models", tmp_path)
    assert done.returncode == 1, done.stderr
    message = json.loads((tmp_path / "termination-log").read_text())["message"]
    assert "LoRA rank 4 is above the 1 vLLM reserves" in message
    assert "set spec.server.vllm.maxLoraRank to 8" in message


def test_missing_fetch_dir_is_a_configuration_error(s3_endpoint, s3_bucket, s3_env, tmp_path):
    dep, _ = _fetch_container(_mdep(s3_endpoint, s3_bucket))
    (fetch,) = dep["spec"]["template"]["spec"]["initContainers"]
    done = _run(fetch, s3_env, tmp_path / "models", tmp_path, KUBETUNE_FETCH_DIR="")
    assert done.returncode == 2
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["outcome"] == "config_error" and "KUBETUNE_FETCH_DIR" in message["message"]


def test_an_adapter_that_is_not_the_revisions_artifact_is_refused_with_both_digests(
    tiny_base_model, adapter, s3_endpoint, s3_bucket, s3_env, tmp_path
):
    """The lineage guarantee under vLLM: the fetch refuses, the operator reads why from it."""
    from kubetune.api.conditions import Reason
    from kubetune.k8s.deployments import observe_revision

    _upload(tiny_base_model, adapter, s3_bucket)
    md = copy.deepcopy(_mdep(s3_endpoint, s3_bucket))
    pinned = "sha256:" + "0" * 64
    md["spec"]["model"]["adapter"]["revision"] = pinned
    dep, _ = _fetch_container(md)
    (fetch,) = dep["spec"]["template"]["spec"]["initContainers"]
    done = _run(fetch, s3_env, tmp_path / "models", tmp_path)
    assert done.returncode == 1, done.stderr
    raw = (tmp_path / "termination-log").read_text()
    found = manifest_digest(json.loads((adapter / "manifest.json").read_text()))
    doc = json.loads(raw)
    assert (doc["reason"], doc["foundDigest"], doc["expectedDigest"]) == (
        Reason.ADAPTER_DIGEST_MISMATCH,
        found,
        pinned,
    )
    assert not (tmp_path / "models" / "model").exists()
    # What the kubelet reports for that pod, as the operator observes it.
    pod = {
        "metadata": {"name": "chat-abc-0"},
        "status": {
            "phase": "Pending",
            "initContainerStatuses": [
                {
                    "name": "fetch",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "message": raw}},
                }
            ],
            "containerStatuses": [
                {"name": "server", "state": {"waiting": {"reason": "PodInitializing"}}}
            ],
        },
    }
    obs = observe_revision({"spec": {"replicas": 1}, "status": {}}, [pod])
    assert obs.failure_reason == Reason.ADAPTER_DIGEST_MISMATCH
    assert found in obs.failure and "init container fetch" in obs.failure
