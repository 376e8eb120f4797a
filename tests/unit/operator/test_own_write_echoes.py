"""The watch event of the operator's own write (a status patch, a child apply) queues no reconcile: the cache
holds that version since the write's answer, or (a status patch's event that came first) it changes status
alone, which only the operator writes. Every change by others still does, the late ones included."""

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
MODEL_DEPLOYMENTS = kopf.Resource("kiri.dev", "v1alpha1", "modeldeployments")
JOBS = kopf.Resource("batch", "v1", "jobs")


def md(
    rv: str, generation: int = 1, annotations: dict[str, str] | None = None, **status: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "kiri.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "m",
            "namespace": "ns",
            "resourceVersion": rv,
            "generation": generation,
            "annotations": annotations or {},
        },
        "spec": {"generation": generation},
        "status": status,
    }


def job(rv: str, args: list[str], **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "m-compress-r1",
            "namespace": "ns",
            "resourceVersion": rv,
            "labels": {L.MODEL_DEPLOYMENT: "m", L.MANAGED_BY: L.MANAGED_BY_VALUE},
        },
        "spec": {"args": args},
        "status": status,
    }


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(cache=Cache(), queue=WorkQueue())


async def delivered(runtime: Runtime, body: dict[str, Any]) -> bool:
    """Deliver one watch event; True when it queued the ModelDeployment (a fresh queue for each)."""
    runtime.queue = queue = WorkQueue()
    memo = kopf.Memo(memos.memo(Config()))
    memo[memos.MEMO_KEY] = runtime
    event: Any = {"type": "MODIFIED", "object": copy.deepcopy(body)}
    if body["kind"] == "ModelDeployment":
        await handlers.modeldeployment_event(event=event, memo=memo)
    else:
        await handlers.child_event(event=event, resource=JOBS, memo=memo)
    return KEY in queue


async def test_the_echo_of_our_status_write_queues_no_reconcile(runtime: Runtime) -> None:
    assert await delivered(runtime, md("1"))
    runtime.cache.put_md(md("2", phase="Progressing"), own=True)  # the answer to our status patch
    assert not await delivered(runtime, md("2", phase="Progressing"))  # its watch event
    assert runtime.cache.md(KEY)["status"] == {"phase": "Progressing"}  # type: ignore[index]
    assert await delivered(runtime, md("3", generation=2, phase="Progressing"))  # the user's next change


async def test_the_echo_of_our_status_write_before_its_answer_queues_no_reconcile(runtime: Runtime) -> None:
    # The watch can deliver our patch's event before the reconcile that wrote it has the answer: the cache
    # still holds what that reconcile planned from, and the event differs from it in status alone.
    assert await delivered(runtime, md("1"))
    assert not await delivered(runtime, md("2", phase="Progressing"))
    assert runtime.cache.md(KEY)["status"] == {"phase": "Progressing"}  # type: ignore[index]
    runtime.cache.put_md(md("2", phase="Progressing"), own=True)  # the answer, after its event
    # Changes by others: a rollout command (an annotation), a new spec.
    assert await delivered(runtime, md("3", annotations={"kiri.dev/promote": "n1"}, phase="Progressing"))
    assert await delivered(runtime, md("4", 2, {"kiri.dev/promote": "n1"}, phase="Progressing"))


async def test_a_change_by_someone_else_before_our_write_is_still_reconciled(runtime: Runtime) -> None:
    assert await delivered(runtime, md("1"))
    # The user changed the spec (version 2) while we planned from version 1; our status patch (version 3)
    # answers with their spec. The event of version 2 comes after that answer: the cache keeps version 3,
    # but the reconcile that wrote it never planned from the new spec, so the key is queued.
    runtime.cache.put_md(md("3", generation=2, phase="Progressing"), own=True)
    assert await delivered(runtime, md("2", generation=2))
    assert runtime.cache.md(KEY)["metadata"]["resourceVersion"] == "3"  # type: ignore[index]
    assert not await delivered(runtime, md("3", generation=2, phase="Progressing"))


async def test_the_echo_of_our_job_apply_queues_no_reconcile(runtime: Runtime) -> None:
    runtime.cache.put_md(md("1"))
    assert await delivered(runtime, job("5", ["a"]))
    runtime.cache.put_child("Job", job("6", ["a", "b"]), own=True)  # our apply's answer
    assert not await delivered(runtime, job("6", ["a", "b"]))
    assert await delivered(runtime, job("7", ["a", "b"], succeeded=1))  # the Job controller's change
