"""Thin kopf wiring: watches feed the caches and the work queue; workers run `Reconciler.reconcile`.

Only event handlers are used (no create/update/delete handlers, no daemons), so kopf never writes to a
ModelDeployment: no progress annotations, no last-handled-configuration, no finalizer. The reconcile is
level-based, so "what happened" does not matter, only "which ModelDeployment to look at again":
- its own events (create, update, resume = the initial listing, deletion);
- events of its children and of their pods (labelled `kiri.dev/modeldeployment`);
- Node changes that the planner can see (labels, readiness, capacity), which requeue every
  ModelDeployment; heartbeats that change none of those are ignored;
- a periodic resync, and the requeue-after a plan asks for (grace periods, bakes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from kiri_operator import credentials, metering, metrics
from kiri_operator import labels as L
from kiri_operator.api.names import GROUP, PLURAL, VERSION
from kiri_operator.caches import CHILD_KINDS, Cache, Key, PodIndex, index_pods, owner_key
from kiri_operator.kube import RESOURCES, Kube
from kiri_operator.planning import Settings
from kiri_operator.queueing import WorkQueue
from kiri_operator.reconciling import Reconciler

log = logging.getLogger(__name__)
CHILD_API = {
    "Deployment": ("apps", "v1", "deployments"),
    "DaemonSet": ("apps", "v1", "daemonsets"),
    "Job": ("batch", "v1", "jobs"),
    "Service": ("", "v1", "services"),
    "ConfigMap": ("", "v1", "configmaps"),
    "ServiceAccount": ("", "v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io", "v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings"),
}


@dataclass
class Config:
    namespaces: list[str] = field(default_factory=list)
    """Empty: every namespace."""
    metrics_port: int | None = None
    workers: int = 4
    resync_seconds: float = 60.0
    status_progress_seconds: float = 10.0
    """How often a status change of progress figures alone (counts, messages) may be written."""
    kubeconfig: str | None = None
    settings: Settings = field(default_factory=Settings)
    liveness: str | None = None  # kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz


@dataclass
class Runtime:
    config: Config = field(default_factory=Config)
    cache: Cache = field(default_factory=Cache)
    queue: WorkQueue[Key] | None = None
    reconciler: Reconciler | None = None
    kube: Kube | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    synced: asyncio.Event | None = None
    event_at: dict[Key, float] = field(default_factory=dict)
    """When the oldest watch event not yet reconciled queued each key (for the event-to-status latency)."""


RUNTIME = Runtime()


def configure(config: Config) -> None:
    RUNTIME.config = config


def _enqueue(key: Key | None, watched: bool = True) -> None:
    if key is not None and RUNTIME.queue is not None and key in RUNTIME.cache.mds:
        if watched:
            RUNTIME.event_at.setdefault(key, time.monotonic())
        RUNTIME.queue.add(key)


def _warm(kube: Kube, cache: Cache, namespace: str | None) -> None:
    """One LIST per kind before the first reconcile, so no plan is made from a half-filled cache.

    Page by page: the cache keeps slim views of nodes and pods, so a fleet never sits in memory whole."""
    if not cache.nodes:
        for _, nodes in kube.list_pages("Node"):
            for node in nodes:
                cache.put_node(node)
    for md in kube.list(RESOURCES_KIND, namespace):
        cache.put_md(md)
    selector = f"{L.MANAGED_BY}={L.MANAGED_BY_VALUE}"
    for kind in CHILD_KINDS:
        for obj in kube.list(kind, namespace, selector):
            cache.put_child(kind, obj)
    for _, pods in kube.list_pages("Pod", namespace, L.MODEL_DEPLOYMENT):
        for pod in pods:
            cache.put_pod(pod)


RESOURCES_KIND = next(k for k, r in RESOURCES.items() if r.plural == PLURAL)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf builds a diff base (a deep copy of the body) for every watch event, for change handlers.
    Kiri has only event handlers: that copy, for every pod, node and DaemonSet event of a fleet, was a
    tenth of the operator's CPU and a churn of short-lived dicts that fragments the heap."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


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


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kiri records its own events; kopf's handler-log events and its state annotations are not wanted.
    settings.posting.enabled = False
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.networking.error_backoffs = [1, 2, 5]
    # kopf keeps one worker per object alive this long after its last event, holding that event's body:
    # with a fleet's pods and nodes churning, 5 s (the default) kept thousands of bodies in memory.
    settings.queueing.idle_timeout = 1.0
    settings.persistence.diffbase_storage = NoDiffBase()
    # Filter on the server: only Kiri's children and their pods travel, not every pod of the cluster.
    for _group, _version, plural in CHILD_API.values():
        settings.watching.label_selectors[plural] = f"{L.MANAGED_BY}={L.MANAGED_BY_VALUE}"
    settings.watching.label_selectors["pods"] = L.MODEL_DEPLOYMENT
    config = RUNTIME.config
    try:
        # A connection per worker, and one for the resync and the executor's other calls.
        kube = Kube.connect(config.kubeconfig, connections=max(1, config.workers) + 1)
    except credentials.CredentialsError as exc:  # retrying cannot fix a kubeconfig: stop with the reason
        raise kopf.PermanentError(str(exc)) from exc
    RUNTIME.kube = kube
    RUNTIME.cache = Cache()
    RUNTIME.queue = WorkQueue()
    RUNTIME.reconciler = Reconciler(kube, RUNTIME.cache, config.settings, config.status_progress_seconds)
    scopes: list[str | None] = list(config.namespaces) or [None]
    for namespace in scopes:
        await asyncio.get_running_loop().run_in_executor(None, _warm, kube, RUNTIME.cache, namespace)
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    for _worker in range(max(1, config.workers)):
        RUNTIME.tasks.append(asyncio.create_task(RUNTIME.queue.worker(_handle)))
    RUNTIME.tasks.append(asyncio.create_task(_resync(config.resync_seconds)))
    for key in RUNTIME.cache.md_keys():
        RUNTIME.queue.add(key)
    log.info(
        "kiri operator started: %d ModelDeployment(s), %d node(s)",
        len(RUNTIME.cache.mds),
        len(RUNTIME.cache.nodes),
    )


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's watches log in with the same credentials as Kiri's own requests.

    Without this handler kopf would log in through the official client (the import Kiri avoids) or, with
    that absent, through a kubeconfig reader that runs no exec plugins. kopf calls it again when the
    credential expires or the server answers 401, so a rotated token file is read again then."""
    try:
        info = credentials.load(RUNTIME.config.kubeconfig)
    except credentials.CredentialsError as exc:
        raise kopf.PermanentError(str(exc)) from exc
    return kopf.ConnectionInfo(
        server=info.server,
        ca_path=info.ca_path,
        ca_data=info.ca_data,
        insecure=info.insecure,
        username=info.username,
        password=info.password,
        token=info.token,
        certificate_data=info.certificate_data,
        private_key_data=info.private_key_data,
        default_namespace=info.default_namespace,
        proxy_url=info.proxy_url,
        expiration=info.expiration,
    )


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    for task in RUNTIME.tasks:
        task.cancel()
    for task in RUNTIME.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    RUNTIME.tasks.clear()
    if RUNTIME.queue is not None:
        RUNTIME.queue.close()
    if RUNTIME.kube is not None:
        RUNTIME.kube.close()


async def _handle(key: Key) -> float | None:
    assert RUNTIME.reconciler is not None
    # Events arriving during this reconcile belong to the next one, which runs because the queue marks it dirty.
    since = RUNTIME.event_at.pop(key, None)
    outcome = await asyncio.get_running_loop().run_in_executor(None, RUNTIME.reconciler.reconcile, key)
    if since is not None and outcome.status_written:
        metrics.EVENT_TO_STATUS_SECONDS.observe(time.monotonic() - since)
    elif since is not None and outcome.status_deferred:
        # The event is reported when its status is written, so deferred writes count in the latency.
        RUNTIME.event_at[key] = min(since, RUNTIME.event_at.get(key, since))
    return outcome.requeue_after


def _relist_pods(kube: Kube, cache: Cache, namespace: str | None) -> set[Key]:
    fresh: PodIndex = {}
    version: int | None = None
    for page_version, page in kube.list_pages("Pod", namespace, L.MODEL_DEPLOYMENT):
        version = page_version
        index_pods(page, fresh)
    return cache.replace_pods(namespace, fresh, version)


async def _resync(every: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        # One pod LIST per watched namespace per resync: if the pod watch went quiet (seen after a restart
        # on a loaded machine), waves still see readiness within one resync instead of holding forever.
        if RUNTIME.kube is not None:
            scopes: list[str | None] = list(RUNTIME.config.namespaces) or [None]
            for namespace in scopes:
                try:
                    stale = await loop.run_in_executor(
                        None, _relist_pods, RUNTIME.kube, RUNTIME.cache, namespace
                    )
                except Exception as exc:  # the watches still feed the cache; retry next resync
                    log.warning("resync: listing pods in %s failed: %s", namespace or "all namespaces", exc)
                    continue
                if stale:
                    log.info("resync: pod cache was stale for %d ModelDeployment(s)", len(stale))
        await loop.run_in_executor(None, release_memory)
        for key in RUNTIME.cache.md_keys():
            _enqueue(key, watched=False)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def modeldeployment_event(event: kopf.RawEvent, **_: Any) -> None:
    body: dict[str, Any] = dict(event.get("object") or {})
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    if event.get("type") == "DELETED":
        RUNTIME.cache.remove_md(key)
        metrics.set_nodes(key[0], key[1], {})
        metering.forget(key[0], key[1])
        return
    RUNTIME.cache.put_md(body)
    _enqueue(key)


# The planner reads no DaemonSet status (each pod's own events carry its readiness), and the DaemonSet
# controller rewrites that status at nearly every pod change: reconciling on those repeats the pod events.
STATUS_UNREAD = frozenset({"DaemonSet"})


def _status_only(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when only status (and bookkeeping such as resourceVersion) differs between two versions."""
    a, b = old.get("metadata") or {}, new.get("metadata") or {}
    meta = ("generation", "labels", "annotations", "deletionTimestamp", "ownerReferences")
    return old.get("spec") == new.get("spec") and all(a.get(f) == b.get(f) for f in meta)


def _child_handler(kind: str) -> Any:
    async def handler(event: kopf.RawEvent, **_: Any) -> None:
        body: dict[str, Any] = dict(event.get("object") or {})
        if event.get("type") == "DELETED":
            _enqueue(RUNTIME.cache.remove_child(kind, body))
            return
        old = None
        if kind in STATUS_UNREAD and (owner := owner_key(body)) is not None:
            name = str((body.get("metadata") or {}).get("name"))
            old = RUNTIME.cache.child(owner, kind, name)
        key = RUNTIME.cache.put_child(kind, body)
        if old is not None and _status_only(old, body):
            return
        _enqueue(key)

    handler.__name__ = f"{kind.lower()}_event"
    return handler


for _kind, (_group, _version, _plural) in CHILD_API.items():
    kopf.on.event(
        _group, _version, _plural, labels={L.MANAGED_BY: L.MANAGED_BY_VALUE}, id=f"{_plural}-event"
    )(_child_handler(_kind))


@kopf.on.event("", "v1", "pods", labels={L.MODEL_DEPLOYMENT: kopf.PRESENT})
async def pod_event(event: kopf.RawEvent, **_: Any) -> None:
    body: dict[str, Any] = dict(event.get("object") or {})
    if event.get("type") == "DELETED":
        _enqueue(RUNTIME.cache.remove_pod(body))
        return
    key, changed = RUNTIME.cache.put_pod(body)
    if changed:
        _enqueue(key)


@kopf.on.event("", "v1", "nodes")
async def node_event(event: kopf.RawEvent, **_: Any) -> None:
    body: dict[str, Any] = dict(event.get("object") or {})
    if event.get("type") == "DELETED":
        changed = RUNTIME.cache.remove_node(str((body.get("metadata") or {}).get("name")))
    else:
        changed = RUNTIME.cache.put_node(body)
    if changed:
        for key in RUNTIME.cache.md_keys():
            _enqueue(key)


def run(config: Config) -> int:
    """Run the operator until interrupted; `--standalone` semantics: no peering objects needed."""
    configure(config)
    namespaces = config.namespaces
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=config.liveness,
        )
    )
    return 0
