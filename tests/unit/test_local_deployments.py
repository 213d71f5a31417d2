"""The local Deployment controller's router programming (kubetune.local.deployments).

Covers: each revision keeps its share of traffic whatever its number of ready replicas (one
backend per ready replica, as an EndpointSlice lists ready pods only); a revision without ready
replicas gets no backend, so the router never sends it a request; the weights reported back
are the ones the router really applies; a crash loop quotes the replica's termination message
(its start-up error), kept across the restart as the kubelet keeps lastState; a ModelDeployment
scaled to zero counts as settled (``kubetune local --exit-when-settled`` does not wait for ever).
"""

from __future__ import annotations

from collections import Counter

from kubetune.local.deployments import (
    DeploymentDriver,
    LocalRevision,
    MdepState,
    Replica,
    grace_seconds,
)
from kubetune.local.processes import Supervisor
from kubetune.local.router import WeightedRouter
from kubetune.local.store import Store


def _state(ready: dict[str, list[bool]]) -> MdepState:
    state = MdepState(router=WeightedRouter())
    port = 20000
    for rev, flags in ready.items():
        local = LocalRevision(name=rev, manifest={}, desired=len(flags))
        for i, flag in enumerate(flags):
            port += 1
            local.replicas.append(
                Replica(index=i, process_name=f"server/x-{rev}-{i}", port=port, ready=flag)
            )
        state.revisions[rev] = local
    return state


def test_each_revision_keeps_its_share_whatever_its_replica_count(tmp_path):
    driver = DeploymentDriver(Store(tmp_path), Supervisor())
    state = _state({"stable": [True, True, True], "canary": [True]})
    state.weights = {"stable": 80, "canary": 20}
    driver._apply_router(state)
    assert len(state.router.backends) == 4
    picks = Counter(state.router.choose().name.split("/")[0] for _ in range(300))
    assert picks == {"stable": 240, "canary": 60}
    assert driver.applied_weights(state) == {"stable": 80, "canary": 20}


def test_revision_without_ready_replicas_gets_no_backend(tmp_path):
    driver = DeploymentDriver(Store(tmp_path), Supervisor())
    state = _state({"stable": [True], "canary": [False]})
    state.weights = {"stable": 50, "canary": 50}
    driver._apply_router(state)
    assert set(state.router.backends) == {"stable/0"}
    assert {state.router.choose().name for _ in range(10)} == {"stable/0"}
    assert driver.applied_weights(state) == {"stable": 100, "canary": 0}


def test_weight_zero_takes_a_revision_out_of_rotation(tmp_path):
    driver = DeploymentDriver(Store(tmp_path), Supervisor())
    state = _state({"stable": [True], "canary": [True]})
    state.weights = {"stable": 50, "canary": 50}
    driver._apply_router(state)
    state.weights = {"stable": 100, "canary": 0}
    driver._apply_router(state)
    assert {state.router.choose().name for _ in range(10)} == {"stable/0"}


def test_crash_loop_quotes_the_termination_message_kept_across_a_restart(tmp_path):
    store = Store(tmp_path)
    driver = DeploymentDriver(store, Supervisor())
    replica = Replica(index=0, process_name="server/x-canary-0", port=20001)
    assert driver._termination_message(replica) is None
    log = driver._termination_log(replica)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(
        '{"outcome": "storage_error", "message": "cannot serve: file:///nope: not a folder"}'
    )
    assert driver._termination_message(replica) == "cannot serve: file:///nope: not a folder"
    # Restarted: the message moves aside and is still what the crash loop quotes.
    log.replace(log.with_name("termination-log.last"))
    assert driver._termination_message(replica) == "cannot serve: file:///nope: not a folder"


def test_stopping_replicas_get_the_pods_grace_period_not_a_fixed_10_seconds():
    # The local runtime stopped servers after 10 s whatever the drain (requestTimeoutSeconds +
    # 5 s): it now gives the grace period the builder derives, as a kubelet does.
    from kubetune.rollout import builders as rb
    from tests.unit.test_rollout_builders import MD, REV

    md = {**MD, "spec": {**MD["spec"], "server": {"requestTimeoutSeconds": 120}}}
    manifest = rb.build_server_deployment(md, REV, role=rb.ROLE_STABLE)
    local = LocalRevision(name=REV.name, manifest=manifest, probe_path="/readyz")
    assert grace_seconds(local) == 120 + 5 + rb.EXIT_MARGIN_SECONDS


def test_scaled_to_zero_is_settled_once_its_servers_are_gone(tmp_path):
    driver = DeploymentDriver(Store(tmp_path), Supervisor())
    obj = {
        "metadata": {"name": "x", "generation": 2},
        "status": {"phase": "ScaledToZero", "observedGeneration": 2},
    }
    assert driver.settled(obj)
    assert not driver.settled({**obj, "status": {**obj["status"], "observedGeneration": 1}})
