"""The crash window of record-then-act, closed by the machine (``rollout.actions.with_orphans_deleted``).

A step that deletes a retired revision also drops it from ``status.retiring``; a runtime that
writes that status and dies before the delete leaves a Deployment that no status entry names
(docs/contracts.md, "Record, then act"). Aspects covered: the next step deletes such a revision
(in replicas mode its pods would otherwise stay behind the shared Service); a revision the status
still names, or one already being deleted in this step, is never added twice; once it is gone,
nothing more is asked.
"""

from __future__ import annotations

from kubetune.api.conditions import Reason
from kubetune.rollout import machine as m
from tests.unit.test_rollout_machine import (
    Sim,
    make_md,
    ready,
    start_canary,
)


def test_a_rolled_back_revision_left_running_by_a_crash_is_deleted_next_step():
    sim = Sim(make_md(mode="replicas"), mode="replicas")
    stable, canary = start_canary(sim, mode="replicas")
    sim.revs[canary] = m.RevisionObservation(
        replicas=1,
        failure="container server: CrashLoopBackOff (exit 1)",
        failure_reason=Reason.CANARY_CRASHLOOP,
    )
    out = sim.step()
    assert out.status["phase"] == "RolledBack" and out.of(m.DeleteRevision) == []
    sim.tick(5)
    out = sim.step()
    # The delete is decided and the revision leaves status in the same step, exactly once.
    assert out.of(m.DeleteRevision) == [m.DeleteRevision(canary, Reason.ROLLED_BACK)]
    assert "retiring" not in out.status
    # The runtime died before deleting: its Deployment is still observed, named by nothing.
    out = sim.step()
    assert out.of(m.DeleteRevision) == [m.DeleteRevision(canary, "Orphaned")]
    assert out.status["stable"]["name"] == stable and out.status["phase"] == "RolledBack"
    # Deleted now: nothing more to do.
    del sim.revs[canary]
    assert sim.step().of(m.DeleteRevision) == []


def test_revisions_the_status_names_are_never_orphans():
    sim = Sim(make_md())
    stable, canary = start_canary(sim)
    sim.revs[canary] = ready(1)
    out = sim.step()
    assert {stable, canary} <= set(sim.revs) and out.of(m.DeleteRevision) == []
