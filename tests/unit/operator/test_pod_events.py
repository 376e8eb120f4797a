"""Pod events queue a reconcile only when the planner can see the change: it reads pods by their node, so a
pod the scheduler has not bound yet queues nothing, and from its binding on every change does."""

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

KEY = ("ns", "m")


def pod(node: str | None, ready: bool = False, phase: str = "Pending") -> dict[str, Any]:
    return {
        "metadata": {
            "name": "m-r1-int8-x7k2p",
            "namespace": "ns",
            "labels": {L.MODEL_DEPLOYMENT: "m", L.COMPONENT: L.COMPONENT_EDGE, L.REVISION: "r1"},
        },
        "spec": {"nodeName": node} if node else {},
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


async def delivered(runtime: Runtime, body: dict[str, Any], kind: str = "MODIFIED") -> bool:
    """Deliver one pod event; True when it queued the ModelDeployment (a fresh queue for each)."""
    runtime.queue = queue = WorkQueue()
    memo = kopf.Memo(memos.memo(Config()))
    memo[memos.MEMO_KEY] = runtime
    await handlers.pod_event(event={"type": kind, "object": copy.deepcopy(body)}, memo=memo)  # type: ignore[arg-type]
    return KEY in queue


async def test_a_pod_is_reconciled_from_its_binding_to_a_node_not_before() -> None:
    runtime = Runtime(cache=Cache(), queue=WorkQueue())
    runtime.cache.put_md({"metadata": {"name": "m", "namespace": "ns", "resourceVersion": "1"}})
    assert not await delivered(runtime, pod(None), "ADDED")  # created by the DaemonSet controller
    assert not await delivered(runtime, pod(None, phase="Unknown"))  # still unbound
    assert runtime.cache.pods[KEY]["m-r1-int8-x7k2p"].phase == "Unknown"  # cached all the same
    assert await delivered(runtime, pod("edge-1"))  # bound by the scheduler
    assert not await delivered(runtime, pod("edge-1"))  # nothing new
    assert await delivered(runtime, pod("edge-1", ready=True, phase="Running"))
    assert await delivered(runtime, pod("edge-1"), "DELETED")


async def test_a_pod_created_on_its_node_is_reconciled_at_once() -> None:
    runtime = Runtime(cache=Cache(), queue=WorkQueue())
    runtime.cache.put_md({"metadata": {"name": "m", "namespace": "ns", "resourceVersion": "1"}})
    assert await delivered(runtime, pod("edge-1"), "ADDED")
