"""The work queue coalesces and serializes; the caches keep the newest object and the planner's view."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from typing import Any

import pytest

from kiri_operator import labels as L
from kiri_operator.caches import Cache, index_pods, pod_view
from kiri_operator.queueing import Backoff, Retry, WorkQueue

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


def test_backoff_doubles_per_failure_within_half_to_full_jitter_caps_and_resets_on_success():
    import random

    backoff: Backoff[str] = Backoff(base=1.0, cap=8.0, rng=random.Random(7))
    delays = [backoff.failed("a") for _ in range(6)]
    for delay, ceiling in zip(delays, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == 6  # jittered: keys that failed together do not retry together
    assert 0.5 <= backoff.failed("b") <= 1.0  # per key
    backoff.succeeded("a")
    assert 0.5 <= backoff.failed("a") <= 1.0


async def test_a_failing_key_comes_back_after_a_growing_backoff_and_a_success_resets_it():
    queue: WorkQueue[str] = WorkQueue(Backoff(base=0.04, cap=10.0))
    runs: list[float] = []
    loop = asyncio.get_running_loop()

    async def handle(key: str) -> float | Retry | None:
        runs.append(loop.time())
        if len(runs) == 1:
            raise RuntimeError("reconcile blew up")
        if len(runs) <= 3:
            return Retry()
        return None

    queue.add("a")
    worker = asyncio.create_task(queue.worker(handle))
    await asyncio.sleep(0.6)
    worker.cancel()
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert len(runs) == 4
    # Lower bounds are the backoff's promise ([d/2, d]); the upper ones only leave room for a busy machine.
    assert 0.02 <= gaps[0] < 0.3 and 0.04 <= gaps[1] < 0.4 and 0.08 <= gaps[2] < 0.5
    assert queue.backoff.failures("a") == 0


async def test_a_failed_reconcile_comes_back_sooner_when_its_plan_asked_for_sooner():
    queue: WorkQueue[str] = WorkQueue(Backoff(base=100.0))
    runs: list[float] = []
    loop = asyncio.get_running_loop()

    async def handle(key: str) -> float | Retry | None:
        runs.append(loop.time())
        return Retry(at_most=0.05) if len(runs) == 1 else None

    queue.add("a")
    worker = asyncio.create_task(queue.worker(handle))
    await asyncio.sleep(0.3)
    worker.cancel()
    assert len(runs) == 2 and 0.04 <= runs[1] - runs[0] <= 0.2


def _child(name: str, rv: str, replicas: int) -> dict:
    return {
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": rv,
            "labels": {L.MODEL_DEPLOYMENT: "md"},
            "ownerReferences": [L.owner_reference("md", "u")],
            "managedFields": [{"manager": "kiri"}],
        },
        "spec": {"replicas": replicas},
    }


def test_cache_keeps_our_write_until_the_watch_shows_it_and_drops_managed_fields():
    cache = Cache()
    cache.put_md({"metadata": {"name": "md", "namespace": "ns", "uid": "u", "generation": 2}, "spec": {}})
    # resourceVersions are opaque: these compare the wrong way round as integers and as strings.
    assert cache.put_child("Deployment", _child("md-cloud", "10", 2), own=True) == ("ns", "md")
    cache.put_child("Deployment", _child("md-cloud", "9", 1))  # a late event from before our write
    cache.put_child("Deployment", _child("md-cloud", "900", 1))  # another late one
    observed = cache.observe(("ns", "md"), datetime.now(UTC), None)
    assert observed is not None and observed.generation == 2
    child = observed.child("Deployment", "md-cloud")
    assert child is not None and child.body["spec"]["replicas"] == 2
    assert "managedFields" not in child.body["metadata"]
    cache.put_child("Deployment", _child("md-cloud", "10", 2))  # the watch shows our write
    cache.put_child("Deployment", _child("md-cloud", "3", 5))  # a later change, whatever its version says
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["spec"]["replicas"] == 5  # type: ignore[index]


def test_a_write_that_changed_nothing_holds_back_no_later_event():
    cache = Cache()
    cache.put_child("Deployment", _child("md-cloud", "a1", 2))
    cache.put_child("Deployment", _child("md-cloud", "a1", 2), own=True)  # no-op apply: same version
    cache.put_child("Deployment", _child("md-cloud", "a2", 3))
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["spec"]["replicas"] == 3  # type: ignore[index]


def test_a_write_whose_answer_comes_after_its_event_and_a_newer_one_neither_hides_nor_holds_back_changes():
    cache = Cache()
    cache.put_child("Deployment", _child("md-cloud", "r9", 1))
    # Our apply's event (r10) and the controller's next change (r11) reach the watch before the apply's
    # answer (r10) reaches the cache: the answer must not replace r11, nor hold back what comes after.
    cache.put_child("Deployment", _child("md-cloud", "r10", 2))
    cache.put_child("Deployment", _child("md-cloud", "r11", 3))
    cache.put_child("Deployment", _child("md-cloud", "r10", 2), own=True)
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["spec"]["replicas"] == 3  # type: ignore[index]
    assert cache.child_event("Deployment", _child("md-cloud", "r12", 4)) == ("ns", "md")
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["spec"]["replicas"] == 4  # type: ignore[index]


def _ready(rv: str, ready: int) -> dict:
    return {**_child("md-cloud", rv, 1), "status": {"readyReplicas": ready}}


def test_an_answer_that_comes_after_any_number_of_newer_events_of_its_write_keeps_the_newest():
    """What a Deployment's creation looks like on kwok (five events in a second, measured): when the
    apply's answer is read after all of them, the cache keeps the last one, Ready, and takes what follows."""
    cache = Cache()
    with cache.writing("Deployment", "ns", "md-cloud"):
        for rv, ready in (("r1", 0), ("r2", 0), ("r3", 0), ("r4", 0), ("r5", 1), ("r6", 1)):
            assert cache.child_event("Deployment", _ready(rv, ready)) == ("ns", "md")
        cache.put_child("Deployment", _ready("r1", 0), own=True)  # the answer to the create
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["status"] == {"readyReplicas": 1}  # type: ignore[index]
    # Nothing is held back waiting for r1's event, which came long ago.
    assert cache.child_event("Deployment", _ready("r7", 2)) == ("ns", "md")
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["status"] == {"readyReplicas": 2}  # type: ignore[index]


def test_an_answer_that_comes_before_its_event_still_waits_for_it_and_its_event_is_an_echo():
    cache = Cache()
    cache.put_child("Deployment", _ready("r1", 0))
    with cache.writing("Deployment", "ns", "md-cloud"):
        cache.put_child("Deployment", _ready("r3", 0), own=True)
    assert cache.child_event("Deployment", _ready("r2", 1)) == ("ns", "md")  # older than our write: dropped
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["metadata"]["resourceVersion"] == "r3"  # type: ignore[index]
    assert cache.child_event("Deployment", _ready("r3", 0)) is None  # our write's own event
    assert cache.child_event("Deployment", _ready("r4", 1)) == ("ns", "md")
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["status"] == {"readyReplicas": 1}  # type: ignore[index]


def test_a_write_whose_event_never_comes_gives_way_at_the_resync_to_the_last_version_it_held_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = Cache()
    cache.put_md({"metadata": {"name": "md", "namespace": "ns", "uid": "u", "resourceVersion": "m1"}})
    with cache.writing("Deployment", "ns", "md-cloud"):
        cache.put_child("Deployment", _ready("r1", 0), own=True)
    # A watch restart lost r1's event; r2 (the pod Ready) is held back behind the write, and nothing follows.
    assert cache.child_event("Deployment", _ready("r2", 1)) == ("ns", "md")
    with cache.writing("ModelDeployment", "ns", "md"):
        cache.put_md({"metadata": {"name": "md", "namespace": "ns", "resourceVersion": "m2"}}, own=True)
    assert cache.md_event(
        {"metadata": {"name": "md", "namespace": "ns", "resourceVersion": "m3"}, "spec": {"x": 1}}
    )
    assert cache.settle() == 0  # not overdue yet
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["status"] == {"readyReplicas": 0}  # type: ignore[index]
    monkeypatch.setattr("kiri_operator.caches.OWN_WRITE_SECONDS", -1.0)
    assert cache.settle() == 2
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["status"] == {"readyReplicas": 1}  # type: ignore[index]
    assert cache.md(("ns", "md"))["spec"] == {"x": 1}  # type: ignore[index]
    assert cache.settle() == 0


def test_a_held_back_event_is_forgotten_once_the_write_s_own_event_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = Cache()
    cache.put_child("Deployment", _ready("r2", 0), own=True)
    cache.child_event("Deployment", _ready("r1", 1))  # older than our write: held back
    assert cache.child_event("Deployment", _ready("r2", 0)) is None  # our write's event
    monkeypatch.setattr("kiri_operator.caches.OWN_WRITE_SECONDS", -1.0)
    assert cache.settle() == 0
    assert cache.child(("ns", "md"), "Deployment", "md-cloud")["status"] == {"readyReplicas": 0}  # type: ignore[index]


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
    cache.put_pod(_pod("a", "ns", "md", ready=False))
    cache.put_pod(_pod("gone", "ns", "md", ready=True))
    cache.put_pod(_pod("x", "other", "md2", ready=False))
    # The watch missed a's readiness and gone's deletion; the LIST has both.
    stale = cache.replace_pods("ns", index_pods([_pod("a", "ns", "md", ready=True)]), cache.mark())
    assert stale == {("ns", "md")}
    assert {p.name: p.ready for p in cache.pods[("ns", "md")].values()} == {"a": True}
    assert cache.pods[("other", "md2")]["x"].ready is False  # another namespace is left alone
    # A LIST that matches the cache changes nothing.
    assert cache.replace_pods("ns", index_pods([_pod("a", "ns", "md", ready=True)]), cache.mark()) == set()
    # A ModelDeployment whose pods are all gone is dropped from the pod cache.
    assert cache.replace_pods("ns", {}, cache.mark()) == {("ns", "md")} and ("ns", "md") not in cache.pods


def test_resync_list_never_undoes_watch_events_that_arrived_while_it_ran():
    # Seen at scale: a LIST merged after the watch had delivered newer events put pods back to not-Ready
    # (and dropped new ones) until the next resync, holding their waves 30 s longer.
    cache = Cache()
    cache.put_pod(_pod("ready-later", "ns", "md", ready=False))
    cache.put_pod(_pod("deleted-later", "ns", "md", ready=True))
    cache.put_pod(_pod("missed", "ns", "md", ready=False))  # its readiness event never came
    started = cache.mark()  # the LIST begins
    cache.put_pod(_pod("ready-later", "ns", "md", ready=True))  # watch, while the LIST runs
    cache.put_pod(_pod("created-later", "ns", "md", ready=True))
    cache.remove_pod(_pod("deleted-later", "ns", "md", ready=True))  # watch DELETED
    snapshot = index_pods(
        [
            _pod("ready-later", "ns", "md", ready=False),
            _pod("deleted-later", "ns", "md", ready=True),
            _pod("missed", "ns", "md", ready=True),
        ]
    )
    stale = cache.replace_pods("ns", snapshot, started)
    assert {p.name: p.ready for p in cache.pods[("ns", "md")].values()} == {
        "ready-later": True,
        "created-later": True,
        "missed": True,
    }
    assert stale == {("ns", "md")}  # only "missed" changed, and that is what the resync is for
    # The next LIST (after the deletion) no longer has the deleted pod, and its tombstone is dropped.
    later = index_pods(
        [
            _pod("ready-later", "ns", "md", ready=True),
            _pod("created-later", "ns", "md", ready=True),
            _pod("missed", "ns", "md", ready=True),
        ]
    )
    assert cache.replace_pods("ns", later, cache.mark()) == set()
    assert cache.tombstones() == {}


def _md(name: str, ns: str = "ns") -> dict:
    return {"metadata": {"name": name, "namespace": ns, "uid": name, "resourceVersion": "x"}, "spec": {}}


def _ds(name: str, md: str) -> dict:
    return {
        "kind": "DaemonSet",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {L.MODEL_DEPLOYMENT: md},
            "resourceVersion": "y",
        },
    }


def _node(name: str) -> dict:
    return {"metadata": {"name": name}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


class ListingKube:
    """What the API server holds after a watch gap: LISTs answer from here."""

    def __init__(self, objects: dict[str, list[dict]]) -> None:
        self.objects = objects

    def list(self, kind: str, namespace: str | None = None, selector: str | None = None) -> list[dict]:
        return [o for o in self.objects.get(kind, []) if namespace in (None, o["metadata"].get("namespace"))]

    def list_pages(self, kind: str, namespace: str | None = None, selector: str | None = None):
        yield "opaque-version", self.list(kind, namespace, selector)


def test_a_relist_after_a_watch_gap_drops_every_kind_of_object_deleted_meanwhile():
    from kiri_operator.syncing import relist

    cache = Cache()
    for name in ("a", "b"):
        cache.put_md(_md(name))
    cache.put_child("DaemonSet", _ds("a-r1-int8", "a"))
    cache.put_child("DaemonSet", _ds("a-r0-int8", "a"))
    cache.put_pod(_pod("p1", "ns", "a", ready=True))
    for name in ("n1", "n2"):
        cache.put_node(_node(name))
    # While the watches were away (410 Gone): b, the old DaemonSet, the pod and node n2 were deleted.
    kube = ListingKube(
        {
            "ModelDeployment": [_md("a")],
            "DaemonSet": [_ds("a-r1-int8", "a")],
            "Node": [_node("n1")],
        }
    )
    changed, nodes_changed = relist(kube, cache, "ns")  # type: ignore[arg-type]
    assert changed == {("ns", "a"), ("ns", "b")} and nodes_changed
    assert cache.md_keys() == [("ns", "a")]
    assert sorted(n for _, n in cache.children[("ns", "a")]) == ["a-r1-int8"]
    assert ("ns", "a") not in cache.pods
    assert sorted(cache.nodes) == ["n1"]
    # Relisting an unchanged world changes nothing.
    assert relist(kube, cache, "ns") == (set(), False)  # type: ignore[arg-type]


def test_a_relist_keeps_what_the_watch_brought_while_it_ran_and_does_not_revive_what_it_deleted():
    cache = Cache()
    cache.put_child("DaemonSet", _ds("a-r0-int8", "a"))
    started = cache.mark()
    cache.put_child("DaemonSet", _ds("a-r2-int8", "a"))  # created while the LIST ran
    cache.remove_child("DaemonSet", _ds("a-r0-int8", "a"))  # deleted while the LIST ran
    changed = cache.replace_children("DaemonSet", "ns", [_ds("a-r0-int8", "a")], started)
    assert sorted(n for _, n in cache.children[("ns", "a")]) == ["a-r2-int8"]
    assert changed == set()


async def test_a_watch_replaying_its_list_makes_the_operator_relist_and_forget_deleted_objects(monkeypatch):
    from kiri_operator import handlers, syncing
    from kiri_operator.memos import Runtime

    monkeypatch.setattr(syncing, "RELIST_SETTLE_SECONDS", 0.01)
    runtime = Runtime()
    runtime.cache.put_md(_md("a"))
    runtime.cache.put_child("DaemonSet", _ds("a-r0-int8", "a"))
    runtime.kube = ListingKube({"ModelDeployment": [_md("a")]})  # type: ignore[assignment]
    task = asyncio.create_task(syncing.relister(runtime))
    from kiri_operator.memos import MEMO_KEY

    memo = {MEMO_KEY: runtime}
    # kopf restarted the Node watch after a 410: its LIST comes back as events of type None.
    await handlers.node_event({"type": None, "object": _node("n1")}, memo=memo)  # type: ignore[arg-type]
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not runtime.cache.children.get(("ns", "a")):
            break
    task.cancel()
    assert not runtime.cache.children.get(("ns", "a"))


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
    assert [v for v, _ in got] == ["500", "500", "500"]  # opaque: as the API said it
    assert [[p["metadata"]["name"] for p in page] for _, page in got] == [["a"], ["b"], ["c"]]
    assert all(q["limit"] == str(LIST_PAGE) and q["labelSelector"] == L.MODEL_DEPLOYMENT for q in queries)
    assert [q.get("continue") for q in queries] == [None, "t1", "t2"]
    flat = kube.list("Pod", "ns", L.MODEL_DEPLOYMENT)
    assert [(p["kind"], p["metadata"]["name"]) for p in flat] == [("Pod", "a"), ("Pod", "b"), ("Pod", "c")]


def test_a_resync_lists_pods_when_their_watch_was_silent_a_whole_period_or_skipped_too_often():
    from kiri_operator.syncing import POD_LIST_SKIPS_MAX, pod_list_due

    assert pod_list_due(None, now=100.0, every=60.0, skipped=0)  # never heard: list
    assert pod_list_due(40.0, now=100.0, every=60.0, skipped=0)  # silent for a whole period: list
    assert not pod_list_due(41.0, now=100.0, every=60.0, skipped=0)  # the watch is talking: skip
    assert not pod_list_due(99.0, now=100.0, every=60.0, skipped=POD_LIST_SKIPS_MAX - 1)
    assert pod_list_due(99.0, now=100.0, every=60.0, skipped=POD_LIST_SKIPS_MAX)  # bounded: list anyway


async def test_while_pod_events_flow_the_resync_lists_pods_once_in_five_periods_and_still_catches_a_lost_event():
    from kiri_operator import handlers, syncing
    from kiri_operator.memos import MEMO_KEY, Config, Runtime

    period = 0.2
    runtime = Runtime(config=Config(namespaces=["ns"], resync_seconds=period))
    runtime.cache.put_md(_md("a"))
    runtime.cache.put_pod(_pod("p", "ns", "a", ready=False))
    lists: list[str] = []

    class CountingKube(ListingKube):
        def list_pages(self, kind: str, namespace: str | None = None, selector: str | None = None):
            lists.append(kind)
            yield from super().list_pages(kind, namespace, selector)

    # The LIST knows p is Ready; the watch lost that event but keeps delivering another pod's.
    runtime.kube = CountingKube({"Pod": [_pod("p", "ns", "a", ready=True)]})  # type: ignore[assignment]
    memo = {MEMO_KEY: runtime}

    async def talk(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        i = 0
        while loop.time() < end and not lists:
            other = _pod("q", "ns", "b", ready=bool(i % 2))
            await handlers.pod_event({"type": "MODIFIED", "object": other}, memo=memo)  # type: ignore[arg-type]
            await asyncio.sleep(0.02)
            i += 1

    started = asyncio.get_running_loop().time()
    task = asyncio.create_task(syncing.resync(runtime))
    try:
        await talk(10 * period)  # until the first LIST
    finally:
        task.cancel()
    waited = asyncio.get_running_loop().time() - started
    assert lists == ["Pod"]
    assert waited >= (syncing.POD_LIST_SKIPS_MAX + 1) * period  # the resyncs before it skipped the LIST
    assert runtime.cache.pods[("ns", "a")]["p"].ready is True  # and it caught the lost event


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
