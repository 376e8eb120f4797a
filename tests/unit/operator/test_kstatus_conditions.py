"""kstatus's `Reconciling` and `Stalled` (what Flux and kpt read): the pure rule, then through the whole
`plan()` at each phase of a rollout. The same rule checked by kstatus itself against real objects is in
tests/e2e/test_rollout.py and tests/integration/gitops."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kiri_operator import conditions as C
from kiri_operator.conditions import Condition, Reason
from kiri_operator.planning.status import invalid_spec_status
from kiri_operator.plans import Check
from planning_worlds import FakeServer, manifest, observed, spec

pytestmark = pytest.mark.timeout(30)

STAGED = {
    "rollout.stages": [{"nodes": 1, "bakeSeconds": 5}, {"percent": 100}],
    "rollout.progressDeadlineSeconds": 10,
}


def progress(conds: list[Condition], phase: str) -> tuple[tuple[str, str], tuple[str, str]]:
    rec, stalled = C.progress_conditions(conds, phase)
    assert (rec.type, stalled.type) == (C.RECONCILING, C.STALLED)
    return (rec.status, rec.reason), (stalled.status, stalled.reason)


def test_healthy_is_neither_reconciling_nor_stalled() -> None:
    conds = [
        Condition(C.READY, "True", Reason.AVAILABLE),
        Condition(C.EDGE_PROGRESSING, "False", "RolledOut"),
    ]
    assert progress(conds, "Healthy") == (("False", "Available"), ("False", "AsExpected"))


def test_a_moving_wave_is_reconciling_with_the_gate_as_reason() -> None:
    conds = [
        Condition(C.READY, "False", "NodesNotReady", "x"),
        Condition(C.EDGE_PROGRESSING, "True", Reason.BAKING, "step 1/2 baking"),
    ]
    assert progress(conds, "Progressing") == (("True", "Baking"), ("False", "AsExpected"))
    rec, _ = C.progress_conditions(conds, "Progressing")
    assert rec.message == "step 1/2 baking"


def test_compression_and_a_stage_pause_are_reconciling() -> None:
    compressing = [
        Condition(C.READY, "False", "Compressing"),
        Condition(C.VARIANTS_VERIFIED, "Unknown", "Compressing"),
    ]
    assert progress(compressing, "Compressing") == (("True", "Compressing"), ("False", "AsExpected"))
    paused = [Condition(C.EDGE_PROGRESSING, "True", Reason.STAGE_PAUSE, "waiting for kiri promote")]
    assert progress(paused, "Paused") == (("True", "StagePause"), ("False", "AsExpected"))
    assert progress([], "Pending") == (("True", "Reconciling"), ("False", "AsExpected"))


def test_a_rollback_stalls_with_the_rollbacks_reason() -> None:
    conds = [
        Condition(C.EDGE_PROGRESSING, "False", "RolledBack", "m"),
        Condition(C.ROLLED_BACK, "True", Reason.ROLLED_BACK_DEADLINE, "no progress for 10s"),
    ]
    rec, stalled = C.progress_conditions(conds, "RolledBack")
    assert (rec.status, rec.reason) == ("False", "Stalled")
    assert (stalled.status, stalled.reason, stalled.message) == (
        "True",
        "ProgressDeadlineExceeded",
        "no progress for 10s",
    )


@pytest.mark.parametrize(
    ("phase", "reason"),
    [("Failed", Reason.ALL_REJECTED), ("Failed", Reason.INVALID_SPEC), ("Degraded", Reason.NO_GPU_NODE)],
)
def test_failures_faults_and_an_invalid_spec_stall_with_degradeds_reason(phase: str, reason: str) -> None:
    conds = [Condition(C.DEGRADED, "True", reason, "why")]
    assert progress(conds, phase) == (("False", "Stalled"), ("True", reason))


@pytest.mark.parametrize("reason", [Reason.INITIAL_FAILING, Reason.ANALYSIS_ERROR])
def test_a_wave_held_by_a_gate_that_needs_a_person_stalls(reason: str) -> None:
    conds = [Condition(C.EDGE_PROGRESSING, "True", reason, "held")]
    assert progress(conds, "Progressing") == (("False", "Stalled"), ("True", reason))


@pytest.mark.parametrize("reason", [Reason.INCONCLUSIVE, Reason.OFFLINE_WAIT, Reason.WAITING_READY])
def test_holds_that_time_can_resolve_stay_reconciling(reason: str) -> None:
    conds = [Condition(C.EDGE_PROGRESSING, "True", reason, "held")]
    assert progress(conds, "Progressing") == (("True", reason), ("False", "AsExpected"))


def test_reconciling_is_never_bad_news_and_stalled_is() -> None:
    assert not Condition(C.RECONCILING, "True", "Baking").is_bad
    assert not Condition(C.RECONCILING, "False", "Available").is_bad
    assert Condition(C.STALLED, "True", "AllRejected").is_bad
    assert not Condition(C.STALLED, "False", "AsExpected").is_bad


# --- through plan() ---------------------------------------------------------------------------------------


def _pair(status: dict[str, Any]) -> tuple[tuple[str, str], tuple[str, str]]:
    by = {c["type"]: c for c in status["conditions"]}
    return (
        (by["Reconciling"]["status"], by["Reconciling"]["reason"]),
        (by["Stalled"]["status"], by["Stalled"]["reason"]),
    )


class Server(FakeServer):
    never_ready: set[str] = set()

    def step(self, s: Any, settings: Any = None, dt: float = 1.0) -> Any:
        p = super().step(s, settings, dt)
        pods = tuple(
            replace(pod, ready=False) if pod.labels.get("kiri.dev/revision") in self.never_ready else pod
            for pod in self.world.pods
        )
        self.world = replace(self.world, pods=pods)
        return p


def test_a_rollout_reads_reconciling_then_stalled_after_rollback_then_current_after_a_new_spec() -> None:
    s1 = spec(**STAGED)
    server = Server(observed())
    p = server.step(s1)
    assert p.status["phase"] == "Compressing"
    assert _pair(p.status) == (("True", "Compressing"), ("False", "AsExpected"))
    server.publish(s1, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        p = server.step(s1)
    assert p.status["phase"] == "Healthy"
    assert _pair(p.status) == (("False", "Available"), ("False", "AsExpected"))

    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:bad"})
    p = server.step(s2)
    server.never_ready = {p.status["updateRevision"]}
    assert p.status["phase"] == "Progressing"
    assert _pair(p.status)[0] == ("True", "WaitingForReady")
    events = list(p.events)
    for _ in range(15):
        p = server.step(s2)
        events += p.events
        if p.status["phase"] == "RolledBack":
            break
    assert p.status["phase"] == "RolledBack"
    assert _pair(p.status) == (("False", "Stalled"), ("True", "ProgressDeadlineExceeded"))
    # Summaries make no Events of their own.
    assert not [e for e in events if e.message.startswith(("Reconciling is", "Stalled is"))]
    # GitOps re-applies the same spec: still stalled, nothing written.
    for _ in range(3):
        p = server.step(s2)
        assert not p.writes
    assert _pair(p.status) == (("False", "Stalled"), ("True", "ProgressDeadlineExceeded"))

    server.never_ready = set()
    s3 = spec(**{**STAGED, "runtime.image": "example/kiri:3"})
    p = server.step(s3)
    assert _pair(p.status) == (("True", "WaitingForReady"), ("False", "AsExpected"))
    for _ in range(15):
        p = server.step(s3)
    assert p.status["phase"] == "Healthy"
    assert _pair(p.status) == (("False", "Available"), ("False", "AsExpected"))
    assert p.status["observedGeneration"] == server.world.generation


def test_an_invalid_spec_stalls_and_a_fixed_spec_is_not_held_by_the_stored_stalled() -> None:
    world = observed()
    bad = invalid_spec_status(world, "spec.edge.variants: empty")
    assert _pair(bad.status) == (("False", "Stalled"), ("True", "InvalidSpec"))
    server = Server(replace(world, status=bad.status))
    p = server.step(spec(**STAGED))
    assert p.status["phase"] == "Compressing"
    assert _pair(p.status) == (("True", "Compressing"), ("False", "AsExpected"))


def test_reverting_git_to_the_stable_spec_after_a_rollback_is_healthy_without_moving_a_node() -> None:
    s1 = spec(**STAGED)
    server = Server(observed())
    server.step(s1)
    server.publish(s1, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        server.step(s1)
    stable = server.world.status["currentRevision"]
    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:bad"})
    p = server.step(s2)
    server.never_ready = {p.status["updateRevision"]}
    for _ in range(15):
        p = server.step(s2)
    assert p.status["phase"] == "RolledBack"
    p = server.step(s1)
    assert p.status["updateRevision"] == stable
    assert not [a for a in p.actions if a.kind == "DaemonSet" and a.check in (Check.CREATE, Check.UPDATE)]
    assert p.status["phase"] == "Healthy"
    assert _pair(p.status) == (("False", "Available"), ("False", "AsExpected"))
