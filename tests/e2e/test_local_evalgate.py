"""The pre-traffic eval gate in the local runtime, with real server processes.

Covers: a new revision whose answers fail the golden prompts (``spec.rollout.evalGate``, read
from a ``promptsUri`` JSONL file, read as the operator reads it) is rolled back before
it gets any traffic: ``EvalGateFailed``, ``evalGateScore`` recorded, weight 0, the router never
sent it a request, and its server processes are gone afterwards. With
``spec.server.apiKeySecret`` the golden prompts carry the key (issue 13), and the status never
holds it.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from kubetune.local.runtime import build_runtime
from kubetune.local.store import Store
from tests.e2e.conftest import processes_under

pytestmark = pytest.mark.slow


def _mdep(base_uri: str, gate: dict | None, batch: int) -> dict:
    spec: dict = {
        "model": {"baseModel": {"uri": base_uri}, "name": "tiny"},
        "replicas": 1,
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "server": {"maxBatchSize": batch},
        "rollout": {"steps": [{"setWeight": 50}], "scaleDownDelaySeconds": 0},
    }
    if gate:
        spec["rollout"]["evalGate"] = gate
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "gated"},
        "spec": spec,
    }


def test_canary_failing_the_golden_prompts_never_gets_traffic(tmp_path, demo_assets):
    base_uri = (demo_assets / "models" / "base").resolve().as_uri()
    golden = tmp_path / "golden.jsonl"
    golden.write_text(
        "".join(
            json.dumps({"prompt": f"Code word for {k}?", "expected": v}) + "\n"
            for k, v in [("zorb", "amber"), ("kiplo", "cobalt")]
        )
    )
    store = Store(tmp_path / "state")

    async def scenario():
        runtime = build_runtime(store)
        await runtime.start()
        try:
            store.apply(_mdep(base_uri, None, 8))

            def status():
                return (store.get("ModelDeployment", "gated") or {}).get("status") or {}

            assert await runtime.run(until=lambda: status().get("phase") == "Healthy", timeout=120)
            # A new revision (server settings changed) with a gate the random base model cannot pass.
            store.apply(
                _mdep(
                    base_uri,
                    {
                        "promptsUri": golden.as_uri(),
                        "match": "exact",
                        "minScore": 0.5,
                        "maxTokens": 4,
                    },
                    4,
                )
            )
            assert await runtime.run(
                until=lambda: (
                    bool(status().get("rejectedRevisions")) and not status().get("retiring")
                ),
                timeout=120,
            )
            router = runtime.drivers["ModelDeployment"].router_of("gated")
            return status(), router.stats(), router.weight_log
        finally:
            await runtime.stop()

    status, stats, weight_log = asyncio.run(scenario())
    (rejected,) = status["rejectedRevisions"]
    assert rejected["reason"].startswith("EvalGateFailed")
    assert status["evalGateScore"] == 0.0
    assert status["weights"]["canary"] == 0
    # The router never had a backend of the rejected revision with a weight above 0.
    assert all(
        not (name.startswith(rejected["name"]) and w > 0)
        for _, table in weight_log
        for name, w in table.items()
    )
    assert not any(name.startswith(rejected["name"]) for name in stats)
    assert processes_under(tmp_path) == []


def test_the_gate_sends_the_api_key_the_servers_require(tmp_path, demo_assets):
    """spec.server.apiKeySecret (issue 13): the golden prompts carry the key from the Secret.

    The gate asks for every prompt to be answered at all (``contains ""``, minScore 1): a
    request without the key would get a 401, count as unanswered and reject the canary.
    """
    import base64

    base_uri = (demo_assets / "models" / "base").resolve().as_uri()
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"prompt": "Code word for zorb?", "expected": ""}) + "\n")
    store = Store(tmp_path / "state")
    key = "kt-e2e-5f4e3d2c1b"

    def keyed(gate: dict | None, batch: int) -> dict:
        md = _mdep(base_uri, gate, batch)
        md["spec"]["server"]["apiKeySecret"] = {"name": "serving-keys"}
        return md

    async def scenario():
        runtime = build_runtime(store)
        await runtime.start()
        try:
            store.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "serving-keys"},
                    "data": {"apiKey": base64.b64encode(key.encode()).decode()},
                }
            )
            store.apply(keyed(None, 8))

            def status():
                return (store.get("ModelDeployment", "gated") or {}).get("status") or {}

            assert await runtime.run(until=lambda: status().get("phase") == "Healthy", timeout=120)
            gate = {"promptsUri": golden.as_uri(), "match": "contains", "minScore": 1.0}
            store.apply(keyed(gate, 4))
            assert await runtime.run(
                until=lambda: (
                    status().get("evalGateScore") is not None
                    or bool(status().get("rejectedRevisions"))
                ),
                timeout=120,
            )
            return status()
        finally:
            await runtime.stop()

    status = asyncio.run(scenario())
    assert status["evalGateScore"] == 1.0, status
    assert not status.get("rejectedRevisions")
    assert key not in json.dumps(status)
    assert processes_under(tmp_path) == []
