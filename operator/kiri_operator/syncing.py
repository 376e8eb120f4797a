"""Keeping the caches in step with the cluster outside the watches: the warm-up LISTs before the first
reconcile, the periodic resync (a pod LIST, a memory trim, every ModelDeployment queued again), and the
relist of every cached kind after a watch restarted from a fresh LIST (a 410 Gone: the objects deleted
while the watch was away have no DELETED event, so only a LIST can show they are gone)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from typing import Any

from kiri_operator import labels as L
from kiri_operator.caches import Cache, Key, PodIndex, index_pods
from kiri_operator.kinds import CHILD_KINDS, MODEL_DEPLOYMENT, NODE, POD
from kiri_operator.kube import Kube
from kiri_operator.memos import Runtime

log = logging.getLogger(__name__)


def warm(kube: Kube, cache: Cache, namespace: str | None, kinds: tuple[str, ...] = CHILD_KINDS) -> None:
    """One LIST per kind before the first reconcile, so no plan is made from a half-filled cache.

    Page by page: the cache keeps slim views of nodes and pods, so a fleet never sits in memory whole."""
    if not cache.nodes:
        for _, nodes in kube.list_pages(NODE.kind):
            for node in nodes:
                cache.put_node(node)
    for md in kube.list(MODEL_DEPLOYMENT.kind, namespace):
        cache.put_md(md)
    selector = L.managed_selector()
    for kind in kinds:
        for obj in kube.list(kind, namespace, selector):
            cache.put_child(kind, obj)
    for _, pods in kube.list_pages(POD.kind, namespace, L.MODEL_DEPLOYMENT):
        for pod in pods:
            cache.put_pod(pod)


def _libc_trim() -> Any:
    """glibc's malloc_trim, or None (musl, macOS): it hands free heap pages back to the kernel."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _libc_trim()


def release_memory() -> None:
    # glibc returns freed memory to the kernel only from the top of its heaps: after a burst of watch
    # events (a fleet's pods created at once) most of the resident peak stays, unused, without this.
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def relist_pods(kube: Kube, cache: Cache, namespace: str | None) -> set[Key]:
    """The pods of `namespace` (all when None) LISTed again and merged into the cache; the keys whose
    pods changed."""
    fresh: PodIndex = {}
    started = cache.mark()
    for _, page in kube.list_pages(POD.kind, namespace, L.MODEL_DEPLOYMENT):
        index_pods(page, fresh)
    return cache.replace_pods(namespace, fresh, started)


def relist(
    kube: Kube, cache: Cache, namespace: str | None, kinds: tuple[str, ...] = CHILD_KINDS
) -> tuple[set[Key], bool]:
    """Every cached kind LISTed again and merged, deletions included: the ModelDeployment keys that
    changed, and whether the nodes did (then every ModelDeployment needs a look)."""
    started = cache.mark()
    nodes = [n for _, page in kube.list_pages(NODE.kind) for n in page]
    nodes_changed = cache.replace_nodes(nodes, started)
    started = cache.mark()
    changed = cache.replace_mds(namespace, kube.list(MODEL_DEPLOYMENT.kind, namespace), started)
    selector = L.managed_selector()
    for kind in kinds:
        started = cache.mark()
        changed |= cache.replace_children(kind, namespace, kube.list(kind, namespace, selector), started)
    changed |= relist_pods(kube, cache, namespace)
    return changed, nodes_changed


RELIST_SETTLE_SECONDS = 2.0


async def relister(runtime: Runtime) -> None:
    """Relist every kind once a watch has restarted from a LIST, until cancelled.

    kopf replays a restarted watch's LIST as events of type None and tells nothing of what vanished;
    `runtime.relist_wanted` is set by those events. A burst of them (one per object) makes one relist,
    after it has been quiet for RELIST_SETTLE_SECONDS. The first burst is kopf's own start-up LIST, so a
    start costs one extra LIST per kind."""
    loop = asyncio.get_running_loop()
    while True:
        await runtime.relist_wanted.wait()
        while runtime.relist_wanted.is_set():
            runtime.relist_wanted.clear()
            await asyncio.sleep(RELIST_SETTLE_SECONDS)
        if runtime.kube is None:
            continue
        for namespace in runtime.config.scopes:
            try:
                changed, nodes = await loop.run_in_executor(
                    None, relist, runtime.kube, runtime.cache, namespace, runtime.config.child_kinds
                )
            except Exception as exc:  # the watches still feed the cache; the next restart or resync retries
                log.warning("relist of %s failed: %s", namespace or "all namespaces", exc)
                runtime.relist_wanted.set()
                await asyncio.sleep(runtime.config.resync_seconds)
                continue
            if changed or nodes:
                log.info("relist after a watch restart: %d ModelDeployment(s) had changed", len(changed))
            for key in runtime.cache.md_keys() if nodes else sorted(changed):
                runtime.enqueue(key, watched=False)
            for key in changed - set(runtime.cache.md_keys()):
                # Deleted while the watch was away: the reconcile of a missing key clears its metrics.
                if runtime.queue is not None:
                    runtime.queue.add(key)


POD_LIST_SKIPS_MAX = 4
"""Resyncs in a row that may skip the pod LIST of a namespace whose pod watch is talking."""


def pod_list_due(heard_at: float | None, now: float, every: float, skipped: int) -> bool:
    """Whether a resync LISTs a namespace's pods: when its pod watch has been silent for a whole resync
    period (a quiet watch is what the LIST is for), and at least every POD_LIST_SKIPS_MAX + 1 periods.

    Mid-rollout the pod watch talks all the time and a fleet's pod LIST was a tenth of the operator's CPU
    (bench/scale); the bounded skip still catches an event lost by a watch that kept talking."""
    return heard_at is None or now - heard_at >= every or skipped >= POD_LIST_SKIPS_MAX


async def resync(runtime: Runtime) -> None:
    """Every `resync_seconds`, until cancelled."""
    loop = asyncio.get_running_loop()
    skipped: dict[str | None, int] = {}
    while True:
        await asyncio.sleep(runtime.config.resync_seconds)
        # A pod LIST per watched namespace when due: if the pod watch went quiet (seen after a restart
        # on a loaded machine), waves still see readiness within one resync instead of holding forever.
        if runtime.kube is not None:
            for namespace in runtime.config.scopes:
                heard_at = runtime.pods_heard_at.get(namespace)
                if not pod_list_due(
                    heard_at, time.monotonic(), runtime.config.resync_seconds, skipped.get(namespace, 0)
                ):
                    skipped[namespace] = skipped.get(namespace, 0) + 1
                    continue
                skipped[namespace] = 0
                try:
                    stale = await loop.run_in_executor(
                        None, relist_pods, runtime.kube, runtime.cache, namespace
                    )
                except Exception as exc:  # the watches still feed the cache; retry next resync
                    log.warning("resync: listing pods in %s failed: %s", namespace or "all namespaces", exc)
                    continue
                if stale:
                    log.info("resync: pod cache was stale for %d ModelDeployment(s)", len(stale))
        await loop.run_in_executor(None, release_memory)
        if taken := runtime.cache.settle():
            log.info(
                "resync: %d object(s) whose write event never came took their last watched version", taken
            )
        for key in runtime.cache.md_keys():
            runtime.enqueue(key, watched=False)
