"""Argo CD health checks and actions for kubetune kinds, run in a real Lua 5.1 runtime (lupa).

Argo CD runs resource customizations in gopher-lua (Lua 5.1) with the live object in the
global ``obj``; these tests do the same with lupa's Lua 5.1 build, against a table of status
objects for each kind.

Covers:
- FineTuneJob: Pending/Validating/Running -> Progressing (with percent), Succeeded -> Healthy,
  Failed -> Degraded with the reason, suspended -> Suspended, unknown phase -> Unknown;
- ModelDeployment: Healthy (Ready=True) -> Healthy, Healthy with Ready=False -> Progressing,
  Progressing canary -> Progressing with the weight, Paused -> Suspended, Degraded/RolledBack ->
  Degraded, FineTuneJob not found -> Missing; ScaledToZero -> Healthy, or Suspended while a new
  revision waits for replicas (RolloutNeedsReplicas);
- observedGeneration: no status, or a status computed for an older generation, is Progressing
  whatever the old phase said (a new spec never shows a stale Healthy or Degraded);
- the custom actions (promote/abort/pause/resume, suspend/resume) and their discovery;
- argocd/argocd-cm.yaml embeds exactly these scripts (no drift) under Argo CD's key names.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

ARGOCD = Path(__file__).resolve().parents[2] / "argocd"
HEALTH = (ARGOCD / "health.lua").read_text()


def _to_lua(lua: lua51.LuaRuntime, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def _from_lua(value: Any) -> Any:
    if lua51.lua_type(value) == "table":
        keys = list(value.keys())
        if keys and all(isinstance(k, int) for k in keys):
            return [_from_lua(value[k]) for k in sorted(keys)]
        return {k: _from_lua(v) for k, v in value.items()}
    return value


def run_lua(script: str, obj: dict[str, Any]) -> Any:
    """Run ``script`` as Argo CD does: a fresh Lua 5.1 state, the object in the global ``obj``."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    return _from_lua(lua.execute(script))


def health(obj: dict[str, Any]) -> tuple[str, str]:
    result = run_lua(HEALTH, obj)
    return result["status"], result.get("message", "")


def ftj(
    phase: str | None, generation: int = 2, observed: int | None = 2, **status: Any
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "generation": generation},
        "spec": {"suspend": status.pop("suspend", False)},
    }
    if phase is not None or status or observed is not None:
        obj["status"] = {"phase": phase, "observedGeneration": observed, **status}
    return obj


def mdep(
    phase: str | None, generation: int = 3, observed: int | None = 3, **status: Any
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "m",
            "namespace": "ns",
            "generation": generation,
            "annotations": status.pop("annotations", {}),
        },
        "spec": {"model": {"fineTuneJobRef": {"name": "j"}}},
    }
    if phase is not None or status or observed is not None:
        obj["status"] = {"phase": phase, "observedGeneration": observed, **status}
    return obj


def cond(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


CASES = [
    # --- FineTuneJob ---
    ("ftj no status", {**ftj(None, observed=None), "status": None}, "Progressing", "pick up"),
    ("ftj pending", ftj("Pending"), "Progressing", "Pending"),
    (
        "ftj validating",
        ftj("Validating", message="Validating data"),
        "Progressing",
        "Validating data",
    ),
    ("ftj running with percent", ftj("Running", progress={"percent": 42}), "Progressing", "42%"),
    (
        "ftj succeeded",
        ftj("Succeeded", artifact={"uri": "s3://out/model/"}),
        "Healthy",
        "s3://out/model/",
    ),
    (
        "ftj failed",
        ftj(
            "Failed",
            message="3 of 12 lines invalid",
            conditions=[cond("Failed", "True", "InvalidData")],
        ),
        "Degraded",
        "InvalidData: 3 of 12 lines invalid",
    ),
    (
        "ftj failed, no condition",
        ftj("Failed", lastFailureReason="OOMKilled"),
        "Degraded",
        "OOMKilled",
    ),
    ("ftj suspended phase", ftj("Suspended"), "Suspended", "Suspended"),
    ("ftj suspend requested", ftj("Running", suspend=True), "Suspended", ""),
    ("ftj unknown phase", ftj("Exploding"), "Unknown", "Exploding"),
    (
        "ftj stale succeeded",
        ftj("Succeeded", generation=3, observed=2),
        "Progressing",
        "generation 3",
    ),
    ("ftj stale failed", ftj("Failed", generation=5, observed=4), "Progressing", "generation 5"),
    (
        "ftj status without observedGeneration",
        ftj("Succeeded", observed=None),
        "Progressing",
        "generation 2",
    ),
    # --- ModelDeployment ---
    ("mdep no status", {**mdep(None, observed=None), "status": None}, "Progressing", "pick up"),
    (
        "mdep healthy",
        mdep("Healthy", conditions=[cond("Ready", "True", "StableReady")]),
        "Healthy",
        "stable",
    ),
    (
        "mdep healthy but not ready",
        mdep("Healthy", conditions=[cond("Ready", "False", "StableNotReady", "1/2 pods ready")]),
        "Progressing",
        "1/2 pods ready",
    ),
    (
        "mdep canary progressing",
        mdep("Progressing", canary={"name": "abc123"}, weights={"stable": 75, "canary": 25}),
        "Progressing",
        "Canary abc123 at 25%",
    ),
    ("mdep pending", mdep("Pending"), "Progressing", "Pending"),
    ("mdep paused", mdep("Paused", paused=True), "Suspended", "promote"),
    (
        "mdep rolled back",
        mdep(
            "RolledBack",
            message="error rate 0.31 > 0.05",
            conditions=[cond("Degraded", "True", "AnalysisFailed")],
        ),
        "Degraded",
        "AnalysisFailed: error rate 0.31 > 0.05",
    ),
    ("mdep degraded", mdep("Degraded"), "Degraded", "Degraded"),
    (
        "mdep scaled to zero",
        mdep(
            "ScaledToZero",
            message="scaled to zero (spec.replicas 0)",
            conditions=[
                cond("Ready", "False", "ScaledToZero"),
                cond("Progressing", "False", "ScaledToZero"),
            ],
        ),
        "Healthy",
        "scaled to zero",
    ),
    (
        "mdep scaled to zero with a revision waiting",
        mdep(
            "ScaledToZero",
            message="scaled to zero; revision b waits",
            conditions=[cond("Progressing", "False", "RolloutNeedsReplicas")],
        ),
        "Suspended",
        "revision b waits",
    ),
    (
        "mdep finetunejob missing",
        mdep(
            "Pending",
            conditions=[
                cond("ModelResolved", "False", "FineTuneJobNotFound", "FineTuneJob j not found")
            ],
        ),
        "Missing",
        "FineTuneJob j not found",
    ),
    (
        "mdep stale healthy",
        mdep("Healthy", generation=4, observed=3),
        "Progressing",
        "generation 4",
    ),
    (
        "mdep stale rolled back",
        mdep("RolledBack", generation=7, observed=6),
        "Progressing",
        "generation 7",
    ),
    ("mdep unknown phase", mdep("Sideways"), "Unknown", "Sideways"),
    (
        "not ours",
        {"kind": "Deployment", "metadata": {"generation": 1}, "status": {"observedGeneration": 1}},
        "Unknown",
        "Deployment",
    ),
]


@pytest.mark.parametrize(("name", "obj", "status", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_health(name: str, obj: dict[str, Any], status: str, fragment: str) -> None:
    got, message = health(obj)
    assert got == status, message
    assert fragment in message


def test_every_argocd_health_status_is_reachable() -> None:
    assert {c[2] for c in CASES} == {
        "Healthy",
        "Progressing",
        "Degraded",
        "Suspended",
        "Missing",
        "Unknown",
    }


def _action(kind: str, name: str) -> str:
    return (ARGOCD / "actions" / f"{kind}-{name}.lua").read_text()


def test_modeldeployment_actions() -> None:
    obj = mdep("Progressing", canary={"name": "abc"}, annotations={"team": "a"})
    found = run_lua(_action("modeldeployment", "discovery"), obj)
    assert {k: v["disabled"] for k, v in found.items()} == {
        "promote": False,
        "abort": False,
        "pause": False,
        "resume": True,
    }
    promoted = run_lua(_action("modeldeployment", "promote"), obj)
    assert promoted["metadata"]["annotations"] == {"team": "a", "kubetune.io/promote": "true"}
    no_annotations = copy.deepcopy(obj)
    del no_annotations["metadata"]["annotations"]
    assert run_lua(_action("modeldeployment", "abort"), no_annotations)["metadata"][
        "annotations"
    ] == {"kubetune.io/abort": "true"}
    paused = run_lua(_action("modeldeployment", "pause"), obj)
    assert paused["metadata"]["annotations"]["kubetune.io/pause"] == "true"
    found = run_lua(_action("modeldeployment", "discovery"), paused)
    assert found["pause"]["disabled"] is True and found["resume"]["disabled"] is False
    resumed = run_lua(_action("modeldeployment", "resume"), paused)
    assert "kubetune.io/pause" not in resumed["metadata"]["annotations"]
    stable_only = run_lua(_action("modeldeployment", "discovery"), mdep("Healthy"))
    assert stable_only["promote"]["disabled"] is True and stable_only["abort"]["disabled"] is True


def test_finetunejob_actions() -> None:
    running = ftj("Running")
    found = run_lua(_action("finetunejob", "discovery"), running)
    assert found["suspend"]["disabled"] is False and found["resume"]["disabled"] is True
    suspended = run_lua(_action("finetunejob", "suspend"), running)
    assert suspended["spec"]["suspend"] is True
    found = run_lua(_action("finetunejob", "discovery"), suspended)
    assert found["suspend"]["disabled"] is True and found["resume"]["disabled"] is False
    assert run_lua(_action("finetunejob", "resume"), suspended)["spec"]["suspend"] is False
    done = run_lua(_action("finetunejob", "discovery"), ftj("Succeeded"))
    assert done["suspend"]["disabled"] is True and done["resume"]["disabled"] is True


def test_argocd_cm_embeds_the_scripts() -> None:
    spec = importlib.util.spec_from_file_location("render_cm", ARGOCD / "render_cm.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, (
        "argocd/argocd-cm.yaml is stale: run python argocd/render_cm.py"
    )
    text = (ARGOCD / "argocd-cm.yaml").read_text()
    cm = yaml.safe_load(text)
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    for kind in ("FineTuneJob", "ModelDeployment"):
        assert cm["data"][f"resource.customizations.health.kubetune.io_{kind}"] == HEALTH
        actions = yaml.safe_load(cm["data"][f"resource.customizations.actions.kubetune.io_{kind}"])
        assert actions["discovery.lua"] == _action(kind.lower(), "discovery")
        for definition in actions["definitions"]:
            assert definition["action.lua"] == _action(kind.lower(), definition["name"])


def test_example_application_points_at_a_path() -> None:
    app = yaml.safe_load((ARGOCD.parent / "examples" / "argocd" / "application.yaml").read_text())
    assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
    assert app["spec"]["source"]["path"] and app["spec"]["destination"]["namespace"]
    assert app["spec"]["syncPolicy"]["automated"]["prune"] is False
