"""Two operator replicas on the real control plane: a Lease elects the leader, the standby writes nothing,
and when the leader is killed (SIGKILL) mid-wave the standby takes the Lease within the lease duration and
finishes the rollout with no step lost or doubled.

The replicas are two `kiri operator --leader-elect` processes (tests/e2e/operator_harness.py) with short
timings, so the test does not wait out client-go's 15 s defaults.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import Cluster
from .operator_harness import Operator, build_model, crd, get_md, model_deployment
from .test_rollout import Rollout, store, three_steps

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("crd")]
__all__ = ["crd", "store"]

LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 6.0, 4.0, 1.0


def replica(cluster: Cluster, namespace: str) -> Operator:
    return Operator(
        cluster,
        namespace,
        "--leader-elect",
        "--leader-elect-resource-namespace",
        namespace,
        "--leader-elect-lease-duration",
        str(LEASE_DURATION),
        "--leader-elect-renew-deadline",
        str(RENEW_DEADLINE),
        "--leader-elect-retry-period",
        str(RETRY_PERIOD),
        # A short resync bounds how long a pod watch that starts quiet can hold the wave (as after a restart).
        "--resync-seconds",
        "15",
    )


def leading(op: Operator) -> bool:
    try:
        return op.counter("kiri_leader") == 1
    except OSError:
        return False


def lease(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return dict(cluster.get_json("lease", "kiri-operator", "-n", namespace)["spec"])


def test_the_standby_takes_over_a_killed_leader_mid_wave_and_no_step_is_lost_or_doubled(
    cluster: Cluster, namespace: str, store: dict[str, Any]
) -> None:
    first = replica(cluster, namespace).start()
    cluster.wait_for(lambda: leading(first), timeout=30, message="the first replica leads")
    second = replica(cluster, namespace).start()
    try:
        r = Rollout(
            cluster,
            namespace,
            store,
            three_steps(),
        )
        r.deploy_first()
        r.set(pod_labels={"build": "2"})
        stages: list[str] = []

        def record(s: dict[str, Any]) -> bool:
            stage = str((s.get("edge") or {}).get("stage") or "")
            if "/" in stage and stage not in stages:
                stages.append(stage)
            return stage.startswith("2/3")

        r.wait(record, what="second wave")
        # The standby watched everything and wrote nothing: not one child, status, Event or Lease renew
        # (its Lease reads are not writes).
        assert leading(second) is False
        assert second.writes() == 0, second.write_breakdown()
        assert second.reconciles() == 0
        held = lease(cluster, namespace)
        assert held["leaseDurationSeconds"] == int(LEASE_DURATION)
        first.kill()
        killed_at = time.monotonic()
        frozen = r.status()
        assert frozen["edge"]["stage"].startswith("2/3")
        cluster.wait_for(lambda: leading(second), timeout=30, interval=0.1, message="the standby leads")
        takeover = time.monotonic() - killed_at
        # At most one lease duration after the last renew it saw (which came at most a retry period
        # before the kill), plus the retry period of its own tries and the scrape's polling.
        assert takeover <= LEASE_DURATION + 2 * RETRY_PERIOD, takeover
        now = lease(cluster, namespace)
        assert now["holderIdentity"] != held["holderIdentity"]
        assert now["leaseTransitions"] == held.get("leaseTransitions", 0) + 1
        status = r.wait(
            lambda s: (
                (record(s) or True)
                and s.get("phase") == "Healthy"
                and s.get("currentRevision") == frozen["updateRevision"]
            ),
            timeout=120,
            what="the new leader completes the rollout",
        )
        # Steps 1, 2, 3 across both replicas: none repeated, none skipped.
        assert [s.split(" ")[0] for s in stages] == ["1/3", "2/3", "3/3"], stages
        steps = [e["message"] for e in r.events("StepStarted")]
        assert len(steps) == len(set(steps)), steps
        promoted = [h for h in status.get("history") or [] if h.get("revision") == status["currentRevision"]]
        assert [h["outcome"] for h in promoted] == ["Promoted"]
        assert second.writes() > 0  # the new leader did the rest
        print(f"standby took the Lease {takeover:.1f}s after the leader's SIGKILL (lease {LEASE_DURATION}s)")
    finally:
        first.stop()
        second.stop()


def test_a_leader_stopped_cleanly_hands_the_lease_over_without_waiting_out_the_lease(
    cluster: Cluster, namespace: str
) -> None:
    first = replica(cluster, namespace).start()
    cluster.wait_for(lambda: leading(first), timeout=30, message="the first replica leads")
    second = replica(cluster, namespace).start()
    try:
        time.sleep(2 * RETRY_PERIOD)
        assert leading(second) is False
        held = lease(cluster, namespace)
        stopping = time.monotonic()
        first.stop()  # SIGTERM: kopf's cleanup releases the Lease
        assert "released Lease" in first.tail(), first.tail()
        cluster.wait_for(lambda: leading(second), timeout=30, interval=0.1, message="the standby leads")
        # Released: the standby's next try takes it, sooner than the lease duration would allow.
        assert time.monotonic() - stopping < LEASE_DURATION
        now = lease(cluster, namespace)
        assert now["holderIdentity"] not in ("", held["holderIdentity"])
        # From nobody to the standby: a hand-over, not a take-over of a live holder's Lease.
        assert now["leaseTransitions"] == held.get("leaseTransitions", 0)
    finally:
        first.stop()
        second.stop()


def lease_writes(op: Operator) -> float:
    return sum(op.counter("kiri_api_requests_total", verb=v, resource="leases") for v in ("create", "update"))


def test_a_paused_leader_resumes_as_a_standby_and_makes_no_write(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """SIGSTOP stands for a leader cut off or frozen (a long GC pause, a partition): its renews stop, the
    standby takes the Lease, and when the old leader wakes its fence has run out: it writes nothing more."""
    first = replica(cluster, namespace).start()
    cluster.wait_for(lambda: leading(first), timeout=30, message="the first replica leads")
    second = replica(cluster, namespace).start()
    assert first.proc is not None
    try:
        model, sha = build_model(tmp_path)
        md = model_deployment("frozen", namespace, model, sha, tmp_path / "store", [])
        md["spec"]["cloud"] = {"replicas": 1}
        cluster.apply(md)
        cluster.wait_for(
            lambda: get_md(cluster, namespace, "frozen").get("status", {}).get("phase") == "Healthy",
            timeout=60,
            message="cloud-only ModelDeployment Healthy",
        )
        writes_before = first.writes() - lease_writes(first)
        first.proc.send_signal(signal.SIGSTOP)
        try:
            cluster.wait_for(lambda: leading(second), timeout=30, interval=0.2, message="the standby leads")
            # The new leader acts on a change made while the old one is frozen.
            md["spec"]["cloud"]["replicas"] = 2
            cluster.apply(md)
            cluster.wait_for(
                lambda: (
                    cluster.get_json("deployment", "frozen-cloud", "-n", namespace)["spec"]["replicas"] == 2
                ),
                timeout=30,
                message="the new leader scales the cloud Deployment",
            )
        finally:
            first.proc.send_signal(signal.SIGCONT)
        # Woken, the old leader finds its leadership over (by its own monotonic clock) and stands by.
        cluster.wait_for(
            lambda: first.counter("kiri_leader") == 0, timeout=10, interval=0.2, message="standby"
        )
        md["spec"]["cloud"]["replicas"] = 3
        cluster.apply(md)
        cluster.wait_for(
            lambda: cluster.get_json("deployment", "frozen-cloud", "-n", namespace)["spec"]["replicas"] == 3,
            timeout=30,
            message="the leader scales again",
        )
        time.sleep(2 * RETRY_PERIOD)
        # Not one write (child, status or Event) from the old leader since it froze; only Lease reads.
        assert first.writes() - lease_writes(first) == writes_before, first.write_breakdown()
        assert leading(second) and not leading(first)
    finally:
        first.stop()
        second.stop()
