"""Edge faults mid-rollout on the real control plane (issue 19): a whole site cut off and back, and a node
flapping every few seconds. The nodes go offline as an edge node does (`hack/cluster node-offline`: NotReady
at once, then a silent lease; see hack/README.md), and the node lifecycle controller marks their pods not
Ready, so what the operator sees is what it would see in a real fleet.

Every wait is on a state read from the API (`Rollout.wait`), never a sleep that hopes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest

from .conftest import Cluster
from .operator_harness import Operator, children, condition, crd, operator_fixture
from .test_rollout import NAME, Rollout, edge_nodes, ready_pod, store

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("crd")]
__all__ = ["crd", "store"]


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    # A short resync bounds how long a pod watch quiet after a node's return can hide its pods' state.
    yield from operator_fixture(cluster, namespace, "--resync-seconds", "10")


def set_ready(cluster: Cluster, nodes: list[str], ready: bool) -> None:
    """All at once, as a site's uplink fails or returns; returns when every node says so."""
    if not nodes:
        return
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(lambda n: cluster.set_node_ready(n, ready, timeout=90), nodes))


def stage_of(status: dict[str, Any]) -> str:
    return str((status.get("edge") or {}).get("stage") or "")


def reason_of(status: dict[str, Any], type_: str = "EdgeProgressing") -> str:
    return str(condition({"status": status}, type_).get("reason") or "")


def test_a_site_cut_off_mid_wave_holds_with_offline_wait_skips_with_offline_skip_and_loses_no_step(
    cluster: Cluster, namespace: str, operator: Operator, store: dict[str, Any]
) -> None:
    r = Rollout(
        cluster,
        namespace,
        store,
        {
            "stages": [{"percent": 100, "bakeSeconds": 15}],
            "groupBy": "kiri.dev/site",
            "maxUnavailable": "100%",
            "offlineNodes": "Wait",
        },
    )
    rev1 = r.deploy_first()
    site_b = cluster.edge_nodes("site-b")
    assert len(site_b) >= 2
    try:
        # --- Wait: site-b's wave has moved and is baking when the whole site drops off the network.
        r.set(pod_labels={"build": "2"})
        baking = r.wait(
            lambda s: stage_of(s).startswith("site-b 2/3") and reason_of(s) == "Baking",
            timeout=90,
            what="site-b's wave baking",
        )
        rev2 = baking["updateRevision"]
        assert {n for n, v in r.placement().items() if v == rev2} >= set(site_b)
        set_ready(cluster, site_b, False)
        held = r.wait(
            lambda s: reason_of(s) == "WaitingForOfflineNodes", timeout=60, what="holding for site-b"
        )
        # Held past the bake's end: a wave is never promoted on nodes the operator cannot see.
        end = held["rollout"]["readyAt"]
        cluster.wait_for(lambda: _seconds_since(end) > 15 + 2, timeout=30, message="bake over while held")
        still = r.status()
        assert reason_of(still) == "WaitingForOfflineNodes", still
        assert still["currentRevision"] == rev1 and stage_of(still).startswith("site-b 2/3"), still
        assert all(r.placement()[c] == rev1 for c in cluster.edge_nodes("site-c"))
        # Back: the wave resumes where it was and the rollout completes.
        set_ready(cluster, site_b, True)
        done = r.wait(
            lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") == rev2,
            timeout=90,
            what="rollout completes once site-b is back",
        )
        steps = sorted(e["message"].split(" (")[0] for e in r.events("StepStarted") if rev2 in e["message"])
        assert steps == [f"step {i}/3 of group site-{x}" for i, x in zip((1, 2, 3), "abc", strict=True)], (
            steps
        )
        assert [h["outcome"] for h in done["history"] if h["revision"] == rev2] == ["Promoted"]
        cluster.wait_for(
            lambda: all(ready_pod(cluster, namespace, n, rev2) for n in edge_nodes(cluster)),
            timeout=60,
            message="every pod Ready on revision 2",
        )

        # --- Skip: the same cut-off defers site-b; the rollout goes on and site-b catches up when back.
        r.set(pod_labels={"build": "3"}, offlineNodes="Skip", stages=[{"percent": 100, "bakeSeconds": 2}])
        r.wait(lambda s: stage_of(s).startswith("site-b 2/3"), timeout=60, what="site-b's wave (Skip)")
        set_ready(cluster, site_b, False)
        done = r.wait(
            lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") not in (rev1, rev2),
            timeout=90,
            what="Skip: the rollout completes without site-b",
        )
        rev3 = done["currentRevision"]
        assert done["edge"]["deferredNodes"] == len(site_b), done["edge"]
        assert [h["outcome"] for h in done["history"] if h["revision"] == rev3] == ["Promoted"]
        set_ready(cluster, site_b, True)
        cluster.wait_for(
            lambda: all(ready_pod(cluster, namespace, n, rev3) for n in site_b),
            timeout=90,
            message="site-b caught up with revision 3",
        )
        steps = [e["message"] for e in r.events("StepStarted") if rev3 in e["message"]]
        assert len(steps) == len(set(steps)) == 3, steps
    finally:
        set_ready(cluster, [n for n in site_b if not cluster.node_ready(n)], True)


def _seconds_since(stamp: str) -> float:
    """Seconds since a timestamp the operator wrote (the operator runs on this machine, with its clock)."""
    return (datetime.now(UTC) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()


def test_a_node_flapping_every_few_seconds_neither_stalls_nor_doubles_and_keeps_status_bounded(
    cluster: Cluster, namespace: str, operator: Operator, store: dict[str, Any]
) -> None:
    r = Rollout(
        cluster,
        namespace,
        store,
        {
            "stages": [{"nodes": 1, "bakeSeconds": 20}, {"percent": 100, "bakeSeconds": 20}],
            "maxUnavailable": "100%",
            "offlineNodes": "Skip",
        },
    )
    rev1 = r.deploy_first()
    flapper = edge_nodes(cluster)[0]  # first in walk order: in every step, the canary's included
    stop = threading.Event()
    flaps: list[int] = []
    errors: list[BaseException] = []

    def flap() -> None:
        # Down 2 s, then up for as long as kwok takes to hand the node its lease back and 2 s more:
        # a cycle of 5-15 s, shorter than each bake.
        try:
            while not stop.is_set():
                cluster.set_node_ready(flapper, False)
                stop.wait(2)
                cluster.set_node_ready(flapper, True, timeout=90)
                flaps.append(1)
                stop.wait(2)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=flap, daemon=True)
    sizes: list[int] = []
    try:
        r.set(pod_labels={"build": "2"})
        thread.start()

        def finished(s: dict[str, Any]) -> bool:
            sizes.append(len(json.dumps(s)))
            assert s.get("phase") not in ("RolledBack", "Failed"), s
            return s.get("phase") == "Healthy" and s.get("currentRevision") not in (None, rev1)

        done = r.wait(finished, timeout=150, what="rollout completes while a node flaps")
        stop.set()
        thread.join(timeout=120)
        assert not errors, errors
        assert len(flaps) >= 3, f"the node flapped only {len(flaps)} times: the test proved nothing"
    finally:
        stop.set()
        thread.join(timeout=120)
        if not cluster.node_ready(flapper):
            cluster.set_node_ready(flapper, True, timeout=90)
    rev2 = done["currentRevision"]
    steps = [e["message"] for e in r.events("StepStarted") if rev2 in e["message"]]
    assert len(steps) == len(set(steps)) == 2, steps
    assert [h["outcome"] for h in done["history"] if h["revision"] == rev2] == ["Promoted"]
    # Bounded: the status holds a fixed set of fields; flapping adds nothing that accumulates.
    assert max(sizes) < 2 * min(sizes), (min(sizes), max(sizes))
    cluster.wait_for(
        lambda: (
            ready_pod(cluster, namespace, flapper, rev2)
            and r.status()["edge"]["readyNodes"] == len(edge_nodes(cluster))
        ),
        timeout=60,
        message="the flapper Ready on revision 2 and counted once",
    )


# --- clock skew between the operator and the API server ---------------------------------------------


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@pytest.mark.parametrize("offset", [600, -600], ids=["operator-10min-ahead", "operator-10min-behind"])
def test_an_operator_clock_ten_minutes_off_the_api_servers_keeps_bakes_and_grace_periods_exact(
    cluster: Cluster, namespace: str, store: dict[str, Any], offset: int
) -> None:
    op = Operator(cluster, namespace, "--clock-offset-seconds", str(offset)).start()
    try:
        r = Rollout(
            cluster,
            namespace,
            store,
            {
                "stages": [{"nodes": 1, "bakeSeconds": 6}, {"percent": 100, "bakeSeconds": 6}],
                "maxUnavailable": "100%",
            },
        )
        # The compression Job completes (kwok) before its manifest is published: its completionTime is the
        # Job controller's, ten minutes off the operator's clock. The grace for the manifest must still be
        # measured from it, not fail at once (10 min ahead) or never (10 min behind).
        r.apply()
        cluster.wait_for(
            lambda: [
                j
                for j in children(cluster, namespace, NAME, "jobs")
                if j.get("status", {}).get("completionTime")
            ],
            timeout=60,
            message="compression Job complete",
        )
        waiting = r.wait(
            lambda s: (
                "waiting for the manifest" in condition({"status": s}, "VariantsVerified").get("message", "")
                or reason_of(s, "VariantsVerified") == "CompressionFailed"
            ),
            timeout=30,
            what="the operator saw the Job complete",
        )
        assert reason_of(waiting, "VariantsVerified") == "Compressing", waiting["conditions"]
        rev1 = r.deploy_first()
        assert not r.events("CompressionFailed")

        # Bakes: every timestamp in status is the operator's; a bake lasts bakeSeconds of real time.
        r.set(pod_labels={"build": "2"})
        baking = r.wait(lambda s: reason_of(s) == "Baking", timeout=60, what="first bake")
        started = time.monotonic()
        ready_at = _time(baking["rollout"]["readyAt"])
        assert abs((ready_at - datetime.now(UTC)).total_seconds() - offset) < 30, (ready_at, offset)
        # How long the bake had already run, on the operator's clock, when the status poll caught it: a poll
        # that comes seconds late (a loaded box) must not make the bake look short.
        lag = (datetime.now(UTC) - ready_at).total_seconds() + offset
        until = _time(baking["rollout"]["message"].rsplit("until ", 1)[1])
        assert (until - ready_at).total_seconds() == 6
        r.wait(lambda s: stage_of(s).startswith("2/2"), timeout=30, what="second step")
        first_bake = time.monotonic() - started + lag
        done = r.wait(
            lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") not in (None, rev1),
            timeout=60,
            what="rollout completes",
        )
        # At least the bake (minus the second status timestamps drop), and no wait for the clocks to agree.
        assert 5 <= first_bake < 6 + 15, (first_bake, lag)
        promoted = [h for h in done["history"] if h["revision"] == done["currentRevision"]]
        assert [h["outcome"] for h in promoted] == ["Promoted"]
        assert abs((_time(promoted[0]["time"]) - datetime.now(UTC)).total_seconds() - offset) < 60
        steps = [e["message"] for e in r.events("StepStarted")]
        assert len(steps) == len(set(steps)) == 2, steps
    finally:
        op.stop()
