"""`spec.rollout.updatePolicy` on revisions the user's spec makes, not only on learned ones: interval and bytes.

Through the operator's whole `plan()` on the simulated API server (tests/planning_worlds.py). Each manifest
variant is 1000 bytes and the fleet has three edge nodes with no site label (one site, "").
"""

from __future__ import annotations

from typing import Any

import pytest

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.planning.building import affinity_nodes
from planning_worlds import FakeServer, manifest, observed, spec

pytestmark = pytest.mark.timeout(30)

STAGED = {"rollout.stages": [{"nodes": 1, "bakeSeconds": 5}, {"percent": 100}]}


def started(policy: dict[str, Any]) -> tuple[FakeServer, dict[str, Any], str]:
    overrides = {**STAGED, "rollout.updatePolicy": policy}
    s1 = spec(**overrides)
    server = FakeServer(observed())
    server.step(s1)
    server.publish(s1, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        server.step(s1)
    assert server.world.status["phase"] == "Healthy"
    return server, overrides, server.world.status["currentRevision"]


def nodes_on(server: FakeServer, revision: str) -> set[str]:
    out: set[str] = set()
    for (kind, _), child in server.world.children.items():
        if kind == "DaemonSet" and child.labels[L.REVISION] == revision:
            out |= set(affinity_nodes(child.body))
    return out


def progressing(status: dict[str, Any]) -> tuple[str, str]:
    c = next(c for c in status["conditions"] if c["type"] == C.EDGE_PROGRESSING)
    return c["reason"], c["message"]


def test_the_first_rollout_is_not_held_and_its_start_and_downloads_are_remembered() -> None:
    server, _, rev1 = started({"minIntervalSeconds": 3600, "maxBytesPerDay": 10_000})
    rollout = server.world.status["rollout"]
    assert nodes_on(server, rev1) == {"edge-gpu", "edge-cpu-1", "edge-cpu-2"}
    assert rollout["startedAt"] == "2026-01-01T12:00:01Z"
    assert rollout["downloads"] == [{"site": "", "bytes": 3000, "time": "2026-01-01T12:00:01Z"}]


def test_a_spec_change_within_min_interval_waits_and_starts_once_the_interval_has_passed() -> None:
    server, overrides, rev1 = started({"minIntervalSeconds": 3600})
    s2 = spec(**{**overrides, "runtime.image": "example/kiri:2"})
    p = server.step(s2)
    rev2 = p.status["updateRevision"]
    assert rev2 != rev1 and nodes_on(server, rev2) == set()
    reason, message = progressing(p.status)
    assert reason == "UpdateDeferred"
    assert message == (
        "updatePolicy: minIntervalSeconds: last rollout started 2026-01-01T12:00:01Z, "
        "the next may start at 2026-01-01T13:00:01Z"
    )
    assert p.requeue_after is not None and p.requeue_after <= 3600
    for _ in range(3):  # held, and steady: no write while it waits
        p = server.step(s2)
        assert nodes_on(server, rev2) == set() and not p.writes
    server.step(s2, dt=3600)  # the clock moves after this plan
    p = server.step(s2)
    assert nodes_on(server, rev2) == {"edge-cpu-1"}  # the canary: the wave goes on as usual
    assert p.status["rollout"]["startedAt"] != "2026-01-01T12:00:01Z"


def test_a_spec_change_that_would_pass_the_sites_bytes_per_day_waits_for_the_window() -> None:
    server, overrides, _ = started({"maxBytesPerDay": 5000})
    s2 = spec(**{**overrides, "runtime.image": "example/kiri:2"})
    p = server.step(s2)
    rev2 = p.status["updateRevision"]
    assert nodes_on(server, rev2) == set()
    reason, message = progressing(p.status)
    assert reason == "UpdateDeferred"
    assert (
        message == "updatePolicy: maxBytesPerDay: site  downloaded 3000 bytes in 24h, 3000 more exceeds 5000"
    )
    server.step(s2, dt=86400)
    p = server.step(s2)
    assert nodes_on(server, rev2) == {"edge-cpu-1"}
    assert [d["bytes"] for d in p.status["rollout"]["downloads"]] == [3000]  # the first day's left the window


def test_without_an_update_policy_a_spec_change_rolls_out_at_once() -> None:
    server, _, _ = started({})
    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:2"})
    p = server.step(s2)
    assert nodes_on(server, p.status["updateRevision"]) == {"edge-cpu-1"}
