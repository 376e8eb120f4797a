"""DaemonSet events that change only status (the controller's counters) queue no reconcile; others do."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from kiri_operator import handlers, memos
from kiri_operator import labels as L
from kiri_operator.caches import Cache
from kiri_operator.memos import Config, Runtime
from kiri_operator.queueing import WorkQueue

pytestmark = pytest.mark.timeout(10)


def child(kind: str, rv: int, nodes: list[str], generation: int = 1, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1" if kind in ("DaemonSet", "Deployment") else "batch/v1",
        "kind": kind,
        "metadata": {
            "name": "c",
            "namespace": "ns",
            "generation": generation,
            "resourceVersion": str(rv),
            "labels": {L.MODEL_DEPLOYMENT: "m"},
        },
        "spec": {"nodes": nodes},
        "status": status,
    }


async def test_status_only_events_of_daemonsets_are_not_reconciled() -> None:
    runtime = Runtime(cache=Cache(), queue=WorkQueue())
    runtime.cache.put_md({"metadata": {"name": "m", "namespace": "ns", "resourceVersion": "1"}})
    memo = kopf.Memo(memos.memo(Config()))
    memo[memos.MEMO_KEY] = runtime
    plurals = {
        "DaemonSet": ("apps", "daemonsets"),
        "Job": ("batch", "jobs"),
        "Deployment": ("apps", "deployments"),
    }

    async def deliver(body: dict[str, Any]) -> bool:
        """Deliver one event; True when it queued the ModelDeployment (a fresh queue for each)."""
        runtime.queue = queue = WorkQueue()
        group, plural = plurals[body["kind"]]
        resource = kopf.Resource(group, "v1", plural)
        await handlers.child_event(
            event={"type": "MODIFIED", "object": copy.deepcopy(body)}, resource=resource, memo=memo
        )
        queued = ("ns", "m") in queue
        assert len(queue) == int(queued)
        return queued

    assert await deliver(child("DaemonSet", 1, ["n1"]))  # first sight
    assert not await deliver(child("DaemonSet", 2, ["n1"], numberReady=1))  # the controller's counters
    cached = runtime.cache.children[("ns", "m")][("DaemonSet", "c")]
    assert cached["status"] == {"numberReady": 1}  # still cached
    assert await deliver(child("DaemonSet", 3, ["n1", "n2"], generation=2, numberReady=1))  # node list
    # Job and Deployment status is what the planner gates on: every change counts.
    assert await deliver(child("Job", 4, []))
    assert await deliver(child("Job", 5, [], succeeded=1))
    assert await deliver(child("Deployment", 6, []))
    assert await deliver(child("Deployment", 7, [], readyReplicas=1))
