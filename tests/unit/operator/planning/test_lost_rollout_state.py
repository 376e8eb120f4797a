"""The wave planner's memory lost or garbled: the stable revision comes back from the DaemonSets, the next
revision still goes through every stage and gate, and garbage in status.rollout is reported, then rebuilt."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.planning.building import affinity_nodes
from planning_worlds import FakeServer, manifest, observed, spec

pytestmark = pytest.mark.timeout(30)

STAGED = {
    "rollout.stages": [{"nodes": 1, "bakeSeconds": 5}, {"percent": 100}],
    "rollout.progressDeadlineSeconds": 10,
}


def healthy() -> tuple[FakeServer, str]:
    s1 = spec(**STAGED)
    server = FakeServer(observed())
    server.step(s1)
    server.publish(s1, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        server.step(s1)
    assert server.world.status["phase"] == "Healthy"
    return server, server.world.status["currentRevision"]


def nodes_on(server: FakeServer) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for (kind, _), child in server.world.children.items():
        if kind == "DaemonSet":
            out.setdefault(child.labels[L.REVISION], set()).update(affinity_nodes(child.body))
    return out


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_a_lost_status_takes_the_stable_revision_from_the_daemonsets_and_the_next_revision_starts_with_the_canary() -> (
    None
):
    server, rev1 = healthy()
    server.world = replace(server.world, status={})  # a restore without status, or a hand edit
    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:2"})
    p = server.step(s2)
    rev2 = p.status["updateRevision"]
    assert nodes_on(server)[rev2] == {"edge-cpu-1"}
    assert nodes_on(server)[rev1] == {"edge-gpu", "edge-cpu-2"}
    assert p.status["rollout"]["stableRevision"] == rev1
    assert p.status["currentRevision"] == rev1
    assert p.status["edge"]["stage"] == "1/2 (1 nodes)"
    rebuilt = [e for e in p.events if e.reason == "StableRevisionRebuilt"]
    assert [e.type for e in rebuilt] == ["Warning"]
    assert f"revision {rev1} runs on the most nodes" in rebuilt[0].message


def test_a_lost_status_mid_rollout_keeps_the_gates_for_the_rest_of_it() -> None:
    server, rev1 = healthy()
    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:2"})
    rev2 = server.step(s2).status["updateRevision"]
    server.world = replace(server.world, status={})
    p = server.step(s2)
    # The canary stays on the update revision, the other two wait for its bake.
    assert nodes_on(server)[rev2] == {"edge-cpu-1"}
    assert nodes_on(server)[rev1] == {"edge-gpu", "edge-cpu-2"}
    assert p.status["rollout"]["stableRevision"] == rev1


def test_revisions_tied_on_the_most_nodes_with_no_status_hold_every_node_with_a_stalled_condition() -> None:
    server, rev1 = healthy()
    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:2"})
    rev2 = server.step(s2).status["updateRevision"]  # the canary edge-cpu-1 moves to rev2
    # The stable fp16 DaemonSet gone (deleted by hand): one node left on each of rev1 and rev2.
    server.world = replace(
        server.world,
        status={},
        children={
            k: c
            for k, c in server.world.children.items()
            if not (k[0] == "DaemonSet" and c.labels[L.REVISION] == rev1 and c.labels[L.VARIANT] == "fp16")
        },
    )
    before = nodes_on(server)
    assert {r: n for r, n in before.items() if n} == {rev1: {"edge-cpu-2"}, rev2: {"edge-cpu-1"}}
    s3 = spec(**{**STAGED, "runtime.image": "example/kiri:3"})
    p = server.step(s3)
    assert {r: n for r, n in nodes_on(server).items() if n} == {rev1: {"edge-cpu-2"}, rev2: {"edge-cpu-1"}}
    progressing = cond(p.status, C.EDGE_PROGRESSING)
    assert (progressing["status"], progressing["reason"]) == ("True", "StableRevisionUnknown")
    assert cond(p.status, C.STALLED)["status"] == "True"
    assert [e.type for e in p.events if e.reason == "StableRevisionUnknown"] == ["Warning"]


def test_garbage_in_status_rollout_is_reported_once_then_the_state_is_rebuilt_from_the_daemonsets() -> None:
    server, rev1 = healthy()
    status = dict(server.world.status)
    status["rollout"] = {"stage": "banana", "stepStartedAt": "yesterday", "history": 7}
    server.world = replace(server.world, status=status)
    s1 = spec(**STAGED)
    p = server.step(s1)
    progressing = cond(p.status, C.EDGE_PROGRESSING)
    assert progressing["reason"] == "RolloutStatusInvalid"
    assert "status.rollout is unreadable (stage:" in progressing["message"]
    # One Warning with the cause (the condition's move is told too, as every move is).
    assert [e.type for e in p.events if e.reason == "RolloutStatusInvalid"] == ["Normal", "Warning"]
    assert p.status["rollout"]["stableRevision"] == rev1
    p = server.step(s1)
    assert cond(p.status, C.EDGE_PROGRESSING)["reason"] == "RolledOut"
    assert not [e for e in p.events if e.reason == "RolloutStatusInvalid"]
    assert p.status["phase"] == "Healthy"
