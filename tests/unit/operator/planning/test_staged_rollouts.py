"""Staged waves through the operator's whole `plan()`: DaemonSets, status, conditions, history, events.

Uses the operator's simulated API server (tests/planning_worlds.py) with one twist: pods
of the revisions in `never_ready` never become Ready, like the `kiri.dev/sim=never-ready` kwok stage.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.observations import PodView
from kiri_operator.planning.building import affinity_nodes
from kiri_operator.plans import Check, Plan
from planning_worlds import FakeServer, manifest, observed, spec

pytestmark = pytest.mark.timeout(30)

STAGED = {
    "rollout.stages": [{"nodes": 1, "bakeSeconds": 5}, {"percent": 100}],
    "rollout.progressDeadlineSeconds": 10,
}


class Server(FakeServer):
    never_ready: set[str]

    def step(self, s: Any, settings: Any = None, dt: float = 1.0) -> Plan:
        p = super().step(s, settings, dt)
        pods = tuple(
            replace(pod, ready=False) if pod.labels.get(L.REVISION) in self.never_ready else pod
            for pod in self.world.pods
        )
        self.world = replace(self.world, pods=pods)
        return p


def started(**overrides: Any) -> tuple[Server, str]:
    s1 = spec(**{**STAGED, **overrides})
    server = Server(observed())
    server.never_ready = set()
    server.step(s1)
    server.publish(s1, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        server.step(s1)
    assert server.world.status["phase"] == "Healthy"
    return server, server.world.status["currentRevision"]


def nodes_on(server: Server) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for (kind, _), child in server.world.children.items():
        if kind == "DaemonSet":
            out.setdefault(child.labels[L.REVISION], set()).update(affinity_nodes(child.body))
    return out


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_the_first_revision_goes_everywhere_at_once_then_waves_start() -> None:
    server, rev1 = started()
    assert nodes_on(server)[rev1] == {"edge-gpu", "edge-cpu-1", "edge-cpu-2"}
    assert server.world.status["rollout"]["stableRevision"] == rev1
    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:2"})
    p = server.step(s2)
    rev2 = p.status["updateRevision"]
    assert nodes_on(server)[rev2] == {"edge-cpu-1"}  # the canary, first in name order
    assert p.status["edge"]["stage"] == "1/2 (1 nodes)"
    assert "stageStartedAt" in p.status["edge"]
    assert any(e.reason == "StepStarted" for e in p.events)
    for _ in range(12):
        p = server.step(s2)
    assert nodes_on(server)[rev2] == {"edge-gpu", "edge-cpu-1", "edge-cpu-2"}
    assert p.status["currentRevision"] == rev2
    assert p.status["phase"] == "Healthy"


def test_a_never_ready_canary_rolls_back_and_the_same_spec_stays_rolled_back() -> None:
    server, rev1 = started()
    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:bad"})
    p = server.step(s2)
    rev2 = p.status["updateRevision"]
    server.never_ready = {rev2}
    events = []
    for _ in range(15):
        p = server.step(s2)
        events += p.events
        if p.status["phase"] == "RolledBack":
            break
    assert p.status["phase"] == "RolledBack"
    rolled = cond(p.status, C.ROLLED_BACK)
    assert (rolled["status"], rolled["reason"]) == ("True", "ProgressDeadlineExceeded")
    assert p.status["history"][-1]["outcome"] == "RolledBack"
    assert p.status["history"][-1]["revision"] == rev2
    assert p.status["currentRevision"] == rev1
    assert any(e.type == "Warning" and e.reason == "RolledBack" for e in events)
    assert nodes_on(server)[rev1] == {"edge-gpu", "edge-cpu-1", "edge-cpu-2"}
    assert not nodes_on(server).get(rev2)
    # GitOps re-applies the same spec: nothing moves, nothing is written.
    server.step(s2)
    writes = server.writes
    for _ in range(5):
        p = server.step(s2)
        assert not p.writes
    assert server.writes == writes
    assert p.status["phase"] == "RolledBack"
    # A changed spec rolls out again.
    s3 = spec(**{**STAGED, "runtime.image": "example/kiri:3"})
    p = server.step(s3)
    assert cond(p.status, C.ROLLED_BACK)["status"] == "False"
    assert any(a.check is Check.CREATE and a.kind == "DaemonSet" for a in p.actions)


def test_abort_annotation_rolls_back_now() -> None:
    server, rev1 = started()
    s2 = spec(
        **{
            **STAGED,
            "runtime.image": "example/kiri:2",
            "rollout.stages": [{"nodes": 1, "bakeSeconds": 600}, {"percent": 100}],
        }
    )
    server.step(s2)
    server.step(s2)
    server.world = replace(server.world, annotations={L.ABORT: "2026-01-01T12:00:05Z"})
    p = server.step(s2)
    assert p.status["phase"] == "RolledBack"
    assert cond(p.status, C.ROLLED_BACK)["reason"] == "Aborted"
    assert nodes_on(server)[rev1] == {"edge-gpu", "edge-cpu-1", "edge-cpu-2"}


def test_paused_spec_shows_paused_phase() -> None:
    server, _ = started()
    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:2", "rollout.paused": True})
    p = server.step(s2)
    assert p.status["phase"] == "Paused"
    assert cond(p.status, C.EDGE_PROGRESSING)["reason"] == "Paused"
    assert p.status["updateRevision"] not in nodes_on(server)


def test_crash_looping_pods_roll_back_without_waiting_for_the_deadline() -> None:
    server, rev1 = started(**{"rollout.progressDeadlineSeconds": 3600})
    s2 = spec(**{**STAGED, "rollout.progressDeadlineSeconds": 3600, "runtime.image": "example/kiri:crash"})
    p = server.step(s2)
    rev2 = p.status["updateRevision"]
    crashing = tuple(
        PodView(pod.name, pod.node, False, "Running", pod.labels, restarts=5)
        if pod.labels.get(L.REVISION) == rev2
        else pod
        for pod in server.world.pods
    )
    server.world = replace(server.world, pods=crashing)
    p = server.step(s2)
    assert p.status["phase"] == "RolledBack"
    assert cond(p.status, C.ROLLED_BACK)["reason"] == "PodsFailed"
    assert nodes_on(server)[rev1] == {"edge-gpu", "edge-cpu-1", "edge-cpu-2"}
