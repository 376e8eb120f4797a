"""The leader-election loop (kiri_operator.electing) and the workers: a standby reconciles nothing; taking
the Lease queues every ModelDeployment; losing it stops reconciles at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kiri_operator import electing, handlers
from kiri_operator.kube.leasing import Timing
from kiri_operator.memos import Runtime
from kiri_operator.metrics import REGISTRY
from kiri_operator.queueing import WorkQueue

pytestmark = pytest.mark.timeout(10)


class StubElector:
    """Leads when the test says so; `step` counts the tries."""

    def __init__(self) -> None:
        self.lead = False
        self.steps = 0
        self.holder = "other"
        self.timing = Timing(lease_duration=1.5, renew_deadline=1.0, retry_period=0.1)

    def step(self) -> bool:
        self.steps += 1
        return self.lead

    def leading(self) -> bool:
        return self.lead


class RefusingReconciler:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def reconcile(self, key: Any) -> Any:
        self.calls.append(key)
        raise AssertionError("a standby must not reconcile")


def leader_gauge() -> float:
    return REGISTRY.get_sample_value("kiri_leader") or 0.0


async def test_a_standby_skips_its_keys_and_the_new_leader_queues_every_modeldeployment() -> None:
    runtime = Runtime()
    for name in ("a", "b"):
        runtime.cache.put_md({"metadata": {"name": name, "namespace": "ns", "uid": name}, "spec": {}})
    runtime.queue = WorkQueue()
    stub = StubElector()
    runtime.elector = stub  # type: ignore[assignment]
    reconciler = RefusingReconciler()
    runtime.reconciler = reconciler  # type: ignore[assignment]
    task = asyncio.create_task(electing.campaign(runtime))
    try:
        await asyncio.sleep(0.3)
        assert stub.steps >= 2 and leader_gauge() == 0
        # A standby's worker drops the key without reconciling.
        assert await handlers._handle(runtime, ("ns", "a")) is None
        assert reconciler.calls == []
        assert len(runtime.queue) == 0
        stub.lead = True
        await asyncio.sleep(0.3)
        assert leader_gauge() == 1
        assert ("ns", "a") in runtime.queue and ("ns", "b") in runtime.queue
        stub.lead = False
        await asyncio.sleep(0.3)
        assert leader_gauge() == 0
        assert await handlers._handle(runtime, ("ns", "b")) is None
        assert reconciler.calls == []
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
