"""The vLLM engine's serving pods (``spec.server.engine: vllm``) and its revisions.

Covers:
- the engine container: `vllm serve` on the fetched folder, the base served as `<name>-base`
  beside the adapter (the built-in server's names), the adapter as a LoRA module under the
  model name, --tensor-parallel-size from resources.gpus, --max-model-len, --gpu-memory-
  utilization, --dtype, --max-lora-rank from the spec or the FineTuneJob's rank (rounded up
  to a value vLLM accepts), extra args last; no adapter means no LoRA flags;
- the fetch init container: the kubetune server image running `kubetune_server.fetch` with
  the same environment as the built-in server (URIs, digest, storage keys from the Secret),
  the models volume, no GPU; the rank vLLM will reserve;
- volumes (models read-only in the engine, shared memory), probes on vLLM's /health, GPUs on
  the engine container, the engine label on pods and Deployment (not in the selector);
- the revision: the hash changes with the engine, the vLLM image and its settings, but a
  builtin spec's hash is what it was before engines existed; status keeps engine and rank;
- the API: server.vllm only with engine vllm, vllm needs GPUs, kubetune-owned flags refused
  in extraArgs (CEL, through `kubetune validate`'s checker);
- every built object valid for Kubernetes (kubernetes-validate).
"""

from __future__ import annotations

import copy

import pytest

from kubetune.api.common import LABEL_ENGINE
from kubetune.api.conditions import Reason
from kubetune.api.modeldeployment import DEFAULT_VLLM_IMAGE, ModelDeploymentSpec
from kubetune.api.validation import validate_manifest
from kubetune.rollout import builders as b
from kubetune.rollout import machine
from kubetune.rollout.revisions import Revision, resolve

MD = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"},
    "spec": {
        "model": {"fineTuneJobRef": {"name": "ft"}, "name": "support-bot"},
        "replicas": 2,
        "resources": {"gpus": 4, "cpu": "8", "memory": "64Gi"},
        "storage": {"endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"},
        "server": {
            "engine": "vllm",
            "port": 8080,
            "maxModelLen": 8192,
            "dtype": "bfloat16",
            "vllm": {"gpuMemoryUtilization": 0.85, "extraArgs": ["--enforce-eager"]},
            "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
        },
    },
}
FTJ = {
    "spec": {"baseModel": {"uri": "s3://models/base"}, "method": {"lora": {"r": 24}}},
    "status": {
        "phase": "Succeeded",
        "artifact": {"uri": "s3://out/ft/model", "digest": "sha256:ab"},
    },
}


def md(**server) -> dict:
    out = copy.deepcopy(MD)
    out["spec"]["server"].update(server)
    return out


def revision(obj: dict = MD, ftj: dict = FTJ) -> Revision:
    rev = resolve(ModelDeploymentSpec.model_validate(obj["spec"]), obj["metadata"]["name"], ftj)
    assert isinstance(rev, Revision)
    return rev


def pod(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_engine_container_serves_the_adapter_as_a_lora_module():
    rev = revision()
    assert rev.engine == "vllm" and rev.image == DEFAULT_VLLM_IMAGE and rev.adapter_rank == 24
    dep = b.build_server_deployment(MD, rev, role=b.ROLE_CANARY)
    (engine,) = pod(dep)["containers"]
    assert engine["image"] == DEFAULT_VLLM_IMAGE and engine["command"] == ["vllm", "serve"]
    assert engine["args"] == [
        "/models/model",
        "--served-model-name",
        "support-bot-base",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--tensor-parallel-size",
        "4",
        "--max-model-len",
        "8192",
        "--gpu-memory-utilization",
        "0.85",
        "--dtype",
        "bfloat16",
        "--enable-lora",
        "--max-loras",
        "1",
        "--max-lora-rank",
        "32",  # the FineTuneJob's rank 24, rounded up to a rank vLLM accepts
        "--lora-modules",
        "support-bot=/models/adapters/support-bot",
        "--enforce-eager",
    ]
    assert engine["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    e = env(engine)
    assert e["HF_HUB_OFFLINE"] == "1" and e["VLLM_NO_USAGE_STATS"] == "1"
    assert e["VLLM_LOGGING_LEVEL"] == "DEBUG"
    # No storage keys in the engine: only the fetch container reads the object store.
    assert "AWS_ACCESS_KEY_ID" not in e and "KUBETUNE_MODEL_URI" not in e


@pytest.mark.parametrize(("gpus", "tp"), [(1, "1"), (2, "2"), (8, "8")])
def test_tensor_parallel_size_is_resources_gpus(gpus, tp):
    obj = copy.deepcopy(MD)
    obj["spec"]["resources"]["gpus"] = gpus
    (engine,) = pod(b.build_server_deployment(obj, revision(obj), role=b.ROLE_STABLE))["containers"]
    args = engine["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == tp
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert engine["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)


@pytest.mark.parametrize(
    ("spec_rank", "trained_rank", "expected"),
    [(None, 8, "8"), (None, 9, "16"), (None, 64, "64"), (None, 300, "320"), (128, 8, "128")],
)
def test_max_lora_rank(spec_rank, trained_rank, expected):
    obj = md(vllm={"maxLoraRank": spec_rank} if spec_rank else {})
    ftj = copy.deepcopy(FTJ)
    ftj["spec"]["method"]["lora"]["r"] = trained_rank
    dep = b.build_server_deployment(obj, revision(obj, ftj), role=b.ROLE_STABLE)
    args = pod(dep)["containers"][0]["args"]
    assert args[args.index("--max-lora-rank") + 1] == expected
    assert env(pod(dep)["initContainers"][0])["KUBETUNE_MAX_LORA_RANK"] == expected


def test_an_explicit_adapter_of_unknown_rank_leaves_vllms_default_and_the_fetch_checks_it():
    obj = copy.deepcopy(MD)
    obj["spec"]["model"] = {
        "baseModel": {"uri": "s3://models/base"},
        "adapter": {"uri": "s3://models/ad", "revision": "v3"},
    }
    rev = revision(obj, None)
    assert rev.adapter_rank is None and rev.model_name == "chat"
    dep = b.build_server_deployment(obj, rev, role=b.ROLE_STABLE)
    args = pod(dep)["containers"][0]["args"]
    assert "--max-lora-rank" not in args and "chat=/models/adapters/chat" in args
    assert env(pod(dep)["initContainers"][0])["KUBETUNE_MAX_LORA_RANK"] == "16"


def test_no_adapter_no_lora_flags_and_the_base_under_the_model_name():
    obj = copy.deepcopy(MD)
    obj["spec"]["model"] = {"baseModel": {"uri": "s3://models/base"}}
    dep = b.build_server_deployment(obj, revision(obj, None), role=b.ROLE_STABLE)
    args = pod(dep)["containers"][0]["args"]
    assert args[args.index("--served-model-name") + 1] == "chat"
    assert not {"--enable-lora", "--lora-modules", "--max-lora-rank"} & set(args)
    assert "KUBETUNE_MAX_LORA_RANK" not in env(pod(dep)["initContainers"][0])


def test_merged_weights_of_a_finetunejob_are_served_without_lora():
    obj = md(mergeAdapter=True)
    ftj = copy.deepcopy(FTJ)
    ftj["status"]["artifact"]["mergedUri"] = "s3://out/ft/merged"
    rev = revision(obj, ftj)
    assert rev.model_uri == "s3://out/ft/merged" and rev.adapter_uri is None
    dep = b.build_server_deployment(obj, rev, role=b.ROLE_STABLE)
    assert "--enable-lora" not in pod(dep)["containers"][0]["args"]
    assert env(pod(dep)["initContainers"][0])["KUBETUNE_MODEL_URI"] == "s3://out/ft/merged"


def test_fetch_init_container_uses_the_server_image_and_its_environment():
    rev = revision()
    dep = b.build_server_deployment(MD, rev, role=b.ROLE_STABLE)
    (fetch,) = pod(dep)["initContainers"]
    assert fetch["name"] == "fetch" and fetch["image"] == "ghcr.io/kubetune/server:0.1.0"
    assert fetch["command"] == ["python", "-m", "kubetune_server.fetch"]
    e = env(fetch)
    # Exactly the built-in server's environment (same settings parser, same checks) plus the
    # folder to fill.
    assert {
        k: v for k, v in e.items() if k not in ("KUBETUNE_FETCH_DIR", "KUBETUNE_MAX_LORA_RANK")
    } == {x["name"]: x.get("value", x.get("valueFrom")) for x in b.server_env(MD, rev)}
    assert e["KUBETUNE_FETCH_DIR"] == "/models"
    assert e["KUBETUNE_MODEL_URI"] == "s3://models/base"
    assert e["KUBETUNE_ADAPTER_URI"] == "s3://out/ft/model"
    assert e["KUBETUNE_ADAPTER_DIGEST"] == "sha256:ab"
    assert e["KUBETUNE_MODEL_NAME"] == "support-bot"
    assert e["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert "nvidia.com/gpu" not in fetch["resources"]["limits"]
    assert fetch["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert {"name": "models", "mountPath": "/models"} in fetch["volumeMounts"]
    assert fetch["terminationMessagePath"] == b.TERMINATION_LOG


def test_volumes_probes_and_security():
    dep = b.build_server_deployment(MD, revision(), role=b.ROLE_STABLE)
    spec = pod(dep)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"] == {"name": "models", "emptyDir": {}}
    assert volumes["shm"] == {"name": "shm", "emptyDir": {"medium": "Memory"}}
    engine = spec["containers"][0]
    mounts = {m["name"]: m for m in engine["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert mounts["shm"]["mountPath"] == "/dev/shm" and mounts["cache"]["mountPath"] == "/cache"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert engine[probe]["httpGet"] == {"port": "http", "path": "/health"}
    assert (
        engine["startupProbe"]["failureThreshold"] * engine["startupProbe"]["periodSeconds"] >= 600
    )
    for c in (engine, spec["initContainers"][0]):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8080"


def test_engine_label_on_pods_and_deployment_not_in_the_selector():
    dep = b.build_server_deployment(MD, revision(), role=b.ROLE_STABLE)
    assert dep["metadata"]["labels"][LABEL_ENGINE] == "vllm"
    assert dep["spec"]["template"]["metadata"]["labels"][LABEL_ENGINE] == "vllm"
    assert LABEL_ENGINE not in dep["spec"]["selector"]["matchLabels"]


def test_revision_hash_changes_with_engine_image_and_settings():
    builtin = copy.deepcopy(MD)
    builtin["spec"]["server"] = {
        k: v for k, v in MD["spec"]["server"].items() if k not in ("engine", "vllm")
    }
    names = {
        "vllm": revision().name,
        "builtin": revision(builtin).name,
        "image": revision(md(vllm={"image": "vllm/vllm-openai:v0.10.2"})).name,
        "memory": revision(md(vllm={"gpuMemoryUtilization": 0.5})).name,
        "args": revision(md(vllm={"extraArgs": []})).name,
    }
    assert len(set(names.values())) == len(names), names
    # Spelling out vLLM's defaults is the same revision as leaving them out.
    assert revision(md(vllm={})).name == revision(md(vllm={"image": DEFAULT_VLLM_IMAGE})).name


@pytest.mark.parametrize(
    ("spec", "before_engines"),
    [
        ({"model": {"baseModel": {"uri": "s3://models/base"}}}, "49accb119e"),
        (
            {
                "model": {
                    "baseModel": {"uri": "s3://models/base"},
                    "adapter": {"uri": "s3://models/ad", "revision": "v1"},
                },
                "server": {"maxBatchSize": 4},
            },
            "7c1966dd0e",
        ),
    ],
)
def test_a_builtin_revision_keeps_the_hash_it_had_before_engines(spec, before_engines):
    """An unchanged builtin ModelDeployment must not start a canary after an operator upgrade.

    The hashes were computed by the operator before server.engine existed. A new server field
    with a non-empty default changes them too: leave it out of a builtin fingerprint the same way.
    """
    s = ModelDeploymentSpec.model_validate(spec)
    assert resolve(s, "chat").name == before_engines
    explicit = copy.deepcopy(spec)
    explicit.setdefault("server", {})["engine"] = "builtin"
    assert resolve(ModelDeploymentSpec.model_validate(explicit), "chat").name == before_engines


def test_status_keeps_engine_and_rank_so_a_lost_deployment_is_rebuilt_the_same():
    rev = revision()
    status = machine._revision_status(rev)
    assert status["engine"] == "vllm" and status["adapterRank"] == 24
    assert status["image"] == DEFAULT_VLLM_IMAGE
    again = machine.revision_from_status(status, "chat")
    assert b.build_server_deployment(MD, again, role=b.ROLE_STABLE) == b.build_server_deployment(
        MD, rev, role=b.ROLE_STABLE
    )


def _errors(spec_patch: dict) -> list[str]:
    obj = copy.deepcopy(MD)
    obj.pop("status", None)
    obj["metadata"] = {"name": "chat", "namespace": "team-a"}
    for key, value in spec_patch.items():
        obj["spec"][key] = value
    return [f"{e.path}: {e.message}" for e in validate_manifest(obj)]


def test_api_accepts_the_vllm_spec():
    assert _errors({}) == []


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            {"server": {"vllm": {"gpuMemoryUtilization": 0.5}}},
            "server.vllm applies to server.engine vllm only",
        ),
        (
            {"server": {"engine": "vllm"}, "resources": {"gpus": 0}},
            "server.engine vllm needs resources.gpus of at least 1",
        ),
        (
            {"server": {"engine": "vllm", "vllm": {"extraArgs": ["--port=9000"]}}},
            "vllm.extraArgs may not set --port",
        ),
        (
            {"server": {"engine": "tgi"}},
            "engine",
        ),
        (
            {"server": {"engine": "vllm", "vllm": {"maxLoraRank": 24}}},
            "maxLoraRank",
        ),
    ],
)
def test_api_refuses_bad_vllm_specs(patch, expected):
    errors = _errors(patch)
    assert any(expected in e for e in errors), errors


def test_built_objects_are_valid_kubernetes():
    kv = pytest.importorskip("kubernetes_validate")
    try:
        kv.validate(
            b.build_server_deployment(MD, revision(), role=b.ROLE_STABLE), "1.30", strict=True
        )
    except kv.utils.SchemaNotFoundError:  # pragma: no cover - schema not bundled
        pytest.skip("no schema for 1.30")


def test_the_local_runtime_refuses_vllm_with_a_clear_message(tmp_path):
    from kubetune.local.loading import ManifestError, load_manifests

    path = tmp_path / "mdep.yaml"
    path.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: ModelDeployment\nmetadata: {name: chat}\n"
        "spec:\n  model: {baseModel: {uri: 'file:///models/base'}}\n  server: {engine: vllm}\n"
    )
    with pytest.raises(ManifestError, match="engine 'vllm' runs in a cluster only"):
        load_manifests(path)


@pytest.mark.parametrize("with_adapter", [True, False])
def test_the_eval_gate_asks_for_a_model_vllm_serves(with_adapter):
    from kubetune.api.modeldeployment import EvalGate, GoldenPrompt
    from kubetune.rollout import evalgate

    obj = copy.deepcopy(MD)
    if not with_adapter:
        obj["spec"]["model"] = {"baseModel": {"uri": "s3://models/base"}, "name": "support-bot"}
    rev = revision(obj, FTJ if with_adapter else None)
    args = pod(b.build_server_deployment(obj, rev, role=b.ROLE_CANARY))["containers"][0]["args"]
    served = {args[args.index("--served-model-name") + 1]}
    if "--lora-modules" in args:
        served |= {m.split("=", 1)[0] for m in args[args.index("--lora-modules") + 1 :] if "=" in m}
    # The operator asks with status.canary.modelName, which is the revision's model name.
    model = machine._revision_status(rev)["modelName"]
    gate = EvalGate(prompts=[GoldenPrompt(prompt="2+2?", expected="4")])
    assert evalgate.request_body(gate.prompts[0], model, gate)["model"] in served


def test_api_key_reaches_vllm_and_not_the_fetch_container():
    obj = md(apiKeySecret={"name": "chat-key"})
    spec = pod(b.build_server_deployment(obj, revision(obj), role=b.ROLE_STABLE))
    ref = {"secretKeyRef": {"name": "chat-key", "key": "apiKey"}}
    assert env(spec["containers"][0])["VLLM_API_KEY"] == ref
    assert ref not in env(spec["initContainers"][0]).values()


def test_vllm_runs_as_the_non_root_user_the_pod_requires():
    from kubetune.api.security import IMAGE_UID

    spec = pod(b.build_server_deployment(MD, revision(), role=b.ROLE_STABLE))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["containers"][0]["securityContext"]["runAsUser"] == IMAGE_UID
    # The fetch container runs the kubetune image, whose own USER applies.
    assert "runAsUser" not in spec["initContainers"][0]["securityContext"]


@pytest.mark.parametrize(
    ("init_status", "reason", "needle"),
    [
        (
            {
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 1,
                        "message": '{"outcome": "storage_error", "message": "s3://m/ad: config.json: sha256 mismatch"}',
                    }
                },
            },
            Reason.CANARY_CRASHLOOP,
            "exit code 1: s3://m/ad: config.json: sha256 mismatch",
        ),
        (
            {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}},
            Reason.IMAGE_PULL,
            "ImagePullBackOff: no such image",
        ),
        ({"state": {"running": {}}}, None, None),
    ],
)
def test_a_failing_fetch_container_fails_the_revision(init_status, reason, needle):
    """Without this the main container only waits in PodInitializing until the deadline."""
    from kubetune.k8s.deployments import observe_revision

    pod = {
        "metadata": {"name": "p"},
        "status": {
            "initContainerStatuses": [{"name": "fetch", **init_status}],
            "containerStatuses": [
                {"name": "server", "state": {"waiting": {"reason": "PodInitializing"}}}
            ],
        },
    }
    obs = observe_revision({"spec": {"replicas": 1}, "status": {}}, [pod])
    if reason is None:
        assert obs.failure is None
    else:
        assert obs.failure_reason == reason
        assert needle in obs.failure and "init container fetch" in obs.failure
