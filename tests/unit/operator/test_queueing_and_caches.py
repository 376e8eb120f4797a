"""The work queue coalesces and serializes; the caches keep the newest object and the planner's view."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from kiri_operator import labels as L
from kiri_operator.caches import Cache, index_pods, pod_view
from kiri_operator.queueing import WorkQueue

pytestmark = pytest.mark.timeout(10)


async def test_events_for_one_key_coalesce_and_a_key_never_runs_twice_at_once():
    queue: WorkQueue[str] = WorkQueue()
    runs: list[str] = []
    active: set[str] = set()
    overlap = False

    async def handle(key: str) -> float | None:
        nonlocal overlap
        overlap |= key in active
        active.add(key)
        runs.append(key)
        await asyncio.sleep(0.05)
        active.discard(key)
        return None

    for _ in range(10):
        queue.add("a")
    queue.add("b")
    workers = [asyncio.create_task(queue.worker(handle)) for _ in range(3)]
    await asyncio.sleep(0.01)
    queue.add("a")  # while "a" runs: it must run once more afterwards, not concurrently
    await asyncio.sleep(0.3)
    for w in workers:
        w.cancel()
    assert sorted(runs) == ["a", "a", "b"] and not overlap


async def test_requeue_after_wakes_the_key_once():
    queue: WorkQueue[str] = WorkQueue()
    runs: list[float] = []
    loop = asyncio.get_running_loop()

    async def handle(key: str) -> float | None:
        runs.append(loop.time())
        return 0.1 if len(runs) == 1 else None

    queue.add("a")
    worker = asyncio.create_task(queue.worker(handle))
    await asyncio.sleep(0.4)
    worker.cancel()
    assert len(runs) == 2 and runs[1] - runs[0] >= 0.09


def _child(name: str, rv: str, replicas: int) -> dict:
    return {
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": rv,
            "labels": {L.MODEL_DEPLOYMENT: "md"},
            "managedFields": [{"manager": "kiri"}],
        },
        "spec": {"replicas": replicas},
    }


def test_cache_keeps_the_newest_child_and_drops_managed_fields():
    cache = Cache()
    cache.put_md({"metadata": {"name": "md", "namespace": "ns", "uid": "u", "generation": 2}, "spec": {}})
    assert cache.put_child("Deployment", _child("md-cloud", "10", 2)) == ("ns", "md")
    cache.put_child("Deployment", _child("md-cloud", "9", 1))  # a late event from before our write
    observed = cache.observe(("ns", "md"), datetime.now(UTC), None)
    assert observed is not None and observed.generation == 2
    child = observed.child("Deployment", "md-cloud")
    assert child is not None and child.body["spec"]["replicas"] == 2
    assert "managedFields" not in child.body["metadata"]


def test_node_heartbeats_are_not_changes_but_readiness_is():
    cache = Cache()
    node = {
        "metadata": {"name": "n1", "labels": {"kiri.dev/tier": "edge"}, "resourceVersion": "1"},
        "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "t1"}]},
    }
    assert cache.put_node(node)
    beat = {
        **node,
        "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "t2"}]},
    }
    assert not cache.put_node(beat)
    down = {**node, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    assert cache.put_node(down)


def _pod(name: str, ns: str, md: str, ready: bool, rv: int | None = None) -> dict:
    meta: dict = {"name": name, "namespace": ns, "labels": {L.MODEL_DEPLOYMENT: md}}
    if rv is not None:
        meta["resourceVersion"] = str(rv)
    return {
        "metadata": meta,
        "spec": {"nodeName": f"node-{name}"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}]},
    }


def test_resync_list_replaces_a_stale_pod_cache_in_its_namespace_only():
    cache = Cache()
    cache.put_pod(_pod("a", "ns", "md", ready=False, rv=10))
    cache.put_pod(_pod("gone", "ns", "md", ready=True, rv=11))
    cache.put_pod(_pod("x", "other", "md2", ready=False, rv=12))
    # The watch missed a's readiness and gone's deletion; the LIST (at 20) has both.
    stale = cache.replace_pods("ns", index_pods([_pod("a", "ns", "md", ready=True, rv=15)]), 20)
    assert stale == {("ns", "md")}
    assert {p.name: p.ready for p in cache.pods[("ns", "md")].values()} == {"a": True}
    assert cache.pods[("other", "md2")]["x"].ready is False  # another namespace is left alone
    # A LIST that matches the cache changes nothing.
    assert cache.replace_pods("ns", index_pods([_pod("a", "ns", "md", ready=True, rv=15)]), 21) == set()
    # A ModelDeployment whose pods are all gone is dropped from the pod cache.
    assert cache.replace_pods("ns", {}, 22) == {("ns", "md")} and ("ns", "md") not in cache.pods


def test_resync_list_never_undoes_watch_events_newer_than_its_snapshot():
    # Seen at scale: a LIST taken at 100, merged after the watch had delivered newer events, put pods
    # back to not-Ready (and dropped new ones) until the next resync, holding their waves 30 s longer.
    cache = Cache()
    cache.put_pod(_pod("ready-later", "ns", "md", ready=False, rv=90))
    cache.put_pod(_pod("ready-later", "ns", "md", ready=True, rv=105))  # watch, after the snapshot
    cache.put_pod(_pod("created-later", "ns", "md", ready=True, rv=106))  # watch, after the snapshot
    cache.put_pod(_pod("deleted-later", "ns", "md", ready=True, rv=95))
    cache.remove_pod(_pod("deleted-later", "ns", "md", ready=True, rv=107))  # watch DELETED
    cache.put_pod(_pod("missed", "ns", "md", ready=False, rv=80))  # its readiness event never came
    snapshot = index_pods(
        [
            _pod("ready-later", "ns", "md", ready=False, rv=90),
            _pod("deleted-later", "ns", "md", ready=True, rv=95),
            _pod("missed", "ns", "md", ready=True, rv=98),
        ]
    )
    stale = cache.replace_pods("ns", snapshot, 100)
    assert {p.name: p.ready for p in cache.pods[("ns", "md")].values()} == {
        "ready-later": True,
        "created-later": True,
        "missed": True,
    }
    assert stale == {("ns", "md")}  # only "missed" changed, and that is what the resync is for
    # A late watch event older than what the LIST brought is ignored too.
    cache.put_pod(_pod("missed", "ns", "md", ready=False, rv=97))
    assert cache.pods[("ns", "md")]["missed"].ready is True
    # The next LIST (after the deletion) no longer has the deleted pod, and its tombstone is dropped.
    later = index_pods(
        [
            _pod("ready-later", "ns", "md", ready=True, rv=105),
            _pod("created-later", "ns", "md", ready=True, rv=106),
            _pod("missed", "ns", "md", ready=True, rv=98),
        ]
    )
    assert cache.replace_pods("ns", later, 110) == set()
    assert cache.tombstones() == {}


def test_lists_are_read_in_pages_that_share_the_first_page_s_resource_version():
    import httpx

    from kiri_operator.kube import Credentials, Kube, http_client
    from kiri_operator.kube.client import LIST_PAGE

    pages = {
        None: {
            "metadata": {"resourceVersion": "500", "continue": "t1"},
            "items": [_pod("a", "ns", "m", True)],
        },
        "t1": {
            "metadata": {"resourceVersion": "500", "continue": "t2"},
            "items": [_pod("b", "ns", "m", True)],
        },
        "t2": {"metadata": {"resourceVersion": "500"}, "items": [_pod("c", "ns", "m", False)]},
    }
    queries: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET" and request.url.path == "/api/v1/namespaces/ns/pods"
        query = dict(request.url.params)
        queries.append(query)
        return httpx.Response(
            200, json={"apiVersion": "v1", "kind": "PodList", **pages[query.get("continue")]}
        )

    credentials = Credentials(server="https://api.test", token="t")
    kube = Kube(http_client(credentials, transport=httpx.MockTransport(handler)))
    got = list(kube.list_pages("Pod", "ns", L.MODEL_DEPLOYMENT))
    assert [v for v, _ in got] == [500, 500, 500]
    assert [[p["metadata"]["name"] for p in page] for _, page in got] == [["a"], ["b"], ["c"]]
    assert all(q["limit"] == str(LIST_PAGE) and q["labelSelector"] == L.MODEL_DEPLOYMENT for q in queries)
    assert [q.get("continue") for q in queries] == [None, "t1", "t2"]
    flat = kube.list("Pod", "ns", L.MODEL_DEPLOYMENT)
    assert [(p["kind"], p["metadata"]["name"]) for p in flat] == [("Pod", "a"), ("Pod", "b"), ("Pod", "c")]


def test_a_pod_view_carries_why_the_pod_is_not_ready_from_its_container_statuses():
    def pod(*statuses: dict[str, Any], init: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
        return {
            "metadata": {"name": "p"},
            "spec": {"nodeName": "n"},
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "False"}],
                "initContainerStatuses": list(init),
                "containerStatuses": list(statuses),
            },
        }

    crashing = {
        "name": "kiri-serve",
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting"}},
        "lastState": {"terminated": {"message": "cache dir /var/cache/kiri not writable\n"}},
    }
    assert (
        pod_view(pod(crashing)).reason
        == "kiri-serve: CrashLoopBackOff: cache dir /var/cache/kiri not writable"
    )
    backing_off = {**crashing, "lastState": {}}
    assert pod_view(pod(backing_off)).reason == "kiri-serve: CrashLoopBackOff: back-off 5m0s restarting"
    pulling = {"name": "cache-dir", "state": {"waiting": {"reason": "ImagePullBackOff"}}}
    assert pod_view(pod(init=(pulling,))).reason == "cache-dir: ImagePullBackOff"
    exited = {
        "name": "kiri-serve",
        "state": {"running": {}},
        "lastState": {"terminated": {"message": "OOM\n"}},
    }
    assert pod_view(pod(exited)).reason == "kiri-serve: OOM"
    assert pod_view(pod({"name": "kiri-serve", "state": {"running": {}}})).reason == ""
