"""Thin kopf wiring: watches feed the caches and the work queue; workers run `Reconciler.reconcile`.

Only event handlers are used (no create/update/delete handlers, no daemons), so kopf never writes to a
ModelDeployment: no progress annotations, no last-handled-configuration, no finalizer. The reconcile is
level-based, so "what happened" does not matter, only "which ModelDeployment to look at again":
- its own events (create, update, resume = the initial listing, deletion);
- events of its children and of their pods (labelled `kiri.dev/modeldeployment`);
- Node changes that the planner can see (labels, readiness, capacity), which requeue every
  ModelDeployment; heartbeats that change none of those are ignored;
- a periodic resync (`syncing`), and the requeue-after a plan asks for (grace periods, bakes).

The handlers are registered in `REGISTRY`, a plain `kopf.OperatorRegistry`: kopf's default registry also
holds its fallback logins (through the official client, or a kubeconfig reader without exec plugins),
and Kiri logs in only with its own credentials. Runtime state lives in kopf's memo (`memos.Runtime`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
import uuid
from typing import Any

import kopf

from kiri_operator import electing, memos, metering, metrics, syncing
from kiri_operator import labels as L
from kiri_operator.analyzing import Analyst
from kiri_operator.caches import Cache, Key, owner_key
from kiri_operator.clocks import Clock
from kiri_operator.kinds import ACCOUNT_KINDS, CHILDREN, MODEL_DEPLOYMENT, NODE, POD, Kind, children
from kiri_operator.kube import CredentialsError, Kube, load_credentials
from kiri_operator.kube.leasing import Elector
from kiri_operator.memos import Config, Runtime
from kiri_operator.queueing import Retry, WorkQueue
from kiri_operator.reconciling import Reconciler

log = logging.getLogger(__name__)
REGISTRY = kopf.OperatorRegistry()


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


@kopf.on.startup(registry=REGISTRY)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
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
    for child in CHILDREN:
        settings.watching.label_selectors[child.plural] = L.managed_selector()
    settings.watching.label_selectors[POD.plural] = L.MODEL_DEPLOYMENT
    runtime = memos.runtime(memo)
    config = runtime.config
    try:
        # A connection per worker, and one for the resync and the executor's other calls.
        kube = Kube.connect(
            config.kubeconfig,
            connections=max(1, config.workers) + 1,
            clock=Clock(config.clock_offset_seconds),
        )
    except CredentialsError as exc:  # retrying cannot fix a kubeconfig: stop with the reason
        raise kopf.PermanentError(str(exc)) from exc
    runtime.kube = kube
    if (election := config.leader_election) is not None:
        # Unique per process, as client-go's `<hostname>_<uuid>`: two processes on one host are two candidates.
        identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:12]}"
        runtime.elector = Elector(kube, election.namespace, election.name, identity, election.timing)
        kube.fence = runtime.elector.remaining
        runtime.tasks.append(asyncio.create_task(electing.campaign(runtime)))
    else:
        metrics.LEADER.set(1)  # alone: it reconciles
    runtime.cache = Cache()
    runtime.queue = WorkQueue()
    loop = asyncio.get_running_loop()

    # A measurement's end (on the analyst's thread) queues its ModelDeployment on the event loop.
    def measured(key: Key) -> None:
        loop.call_soon_threadsafe(runtime.enqueue, key, False)

    runtime.analyst = Analyst(measured)
    runtime.reconciler = Reconciler(
        kube, runtime.cache, config.settings, config.status_progress_seconds, analyst=runtime.analyst
    )
    for namespace in config.scopes:
        await asyncio.get_running_loop().run_in_executor(
            None, syncing.warm, kube, runtime.cache, namespace, config.child_kinds
        )
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    for _worker in range(max(1, config.workers)):
        runtime.tasks.append(asyncio.create_task(runtime.queue.worker(functools.partial(_handle, runtime))))
    runtime.tasks.append(asyncio.create_task(syncing.resync(runtime)))
    runtime.tasks.append(asyncio.create_task(syncing.relister(runtime)))
    for key in runtime.cache.md_keys():
        runtime.queue.add(key)
    log.info(
        "kiri operator started: %d ModelDeployment(s), %d node(s)",
        len(runtime.cache.mds),
        len(runtime.cache.nodes),
    )


@kopf.on.login(registry=REGISTRY)
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf's watches log in with the same credentials as Kiri's own requests.

    Without this handler kopf would log in through the official client (the import Kiri avoids) or, with
    that absent, through a kubeconfig reader that runs no exec plugins. kopf calls it again when the
    credential expires or the server answers 401, so a rotated token file is read again then."""
    try:
        info = load_credentials(memos.runtime(memo).config.kubeconfig)
    except CredentialsError as exc:
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


@kopf.on.cleanup(registry=REGISTRY)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime = memos.runtime(memo)
    for task in runtime.tasks:
        task.cancel()
    await electing.release(runtime)
    for task in runtime.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    runtime.tasks.clear()
    if runtime.queue is not None:
        runtime.queue.close()
    if runtime.analyst is not None:
        runtime.analyst.close()
    if runtime.kube is not None:
        runtime.kube.close()


async def _handle(runtime: Runtime, key: Key) -> float | Retry | None:
    assert runtime.reconciler is not None
    if not runtime.leading():
        # A standby: the leader reconciles. Becoming the leader queues every ModelDeployment again.
        runtime.event_at.pop(key, None)
        return None
    # Events arriving during this reconcile belong to the next one, which runs because the queue marks it dirty.
    since = runtime.event_at.pop(key, None)
    outcome = await asyncio.get_running_loop().run_in_executor(None, runtime.reconciler.reconcile, key)
    if since is not None and outcome.status_written:
        metrics.EVENT_TO_STATUS_SECONDS.observe(time.monotonic() - since)
    elif since is not None and outcome.status_deferred:
        # The event is reported when its status is written, so deferred writes count in the latency.
        runtime.event_at[key] = min(since, runtime.event_at.get(key, since))
    if outcome.error is not None:
        return Retry(at_most=outcome.requeue_after)
    return outcome.requeue_after


def _listing(runtime: Runtime, event: kopf.RawEvent) -> None:
    """kopf replays a (re)started watch's LIST as events of type None, and says nothing of the objects
    deleted while it was away: ask for a relist of every kind (syncing.relister)."""
    if event.get("type") is None:
        runtime.relist_wanted.set()


@kopf.on.event(MODEL_DEPLOYMENT.group, MODEL_DEPLOYMENT.version, MODEL_DEPLOYMENT.plural, registry=REGISTRY)
async def modeldeployment_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    runtime = memos.runtime(memo)
    body: dict[str, Any] = dict(event.get("object") or {})
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    _listing(runtime, event)
    if event.get("type") == "DELETED":
        runtime.cache.remove_md(key)
        metrics.set_nodes(key[0], key[1], {})
        metering.forget(key[0], key[1])
        return
    runtime.cache.put_md(body)
    runtime.enqueue(key)


# The planner reads no DaemonSet status (each pod's own events carry its readiness), and the DaemonSet
# controller rewrites that status at nearly every pod change: reconciling on those repeats the pod events.
STATUS_UNREAD = frozenset({"DaemonSet"})


def _status_only(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when only status (and bookkeeping such as resourceVersion) differs between two versions."""
    a, b = old.get("metadata") or {}, new.get("metadata") or {}
    meta = ("generation", "labels", "annotations", "deletionTimestamp", "ownerReferences")
    return old.get("spec") == new.get("spec") and all(a.get(f) == b.get(f) for f in meta)


_CHILD_BY_PLURAL = {child.plural: child.kind for child in CHILDREN}
_WATCHED_ACCOUNTS: set[str] = set()


async def child_event(event: kopf.RawEvent, resource: kopf.Resource, memo: kopf.Memo, **_: Any) -> None:
    """An event of one of Kiri's children (every kind of `kinds.CHILDREN`, told apart by `resource`)."""
    runtime = memos.runtime(memo)
    kind = _CHILD_BY_PLURAL[resource.plural]
    body: dict[str, Any] = dict(event.get("object") or {})
    _listing(runtime, event)
    if event.get("type") == "DELETED":
        runtime.enqueue(runtime.cache.remove_child(kind, body))
        return
    old = None
    if kind in STATUS_UNREAD and (owner := owner_key(body)) is not None:
        name = str((body.get("metadata") or {}).get("name"))
        old = runtime.cache.child(owner, kind, name)
    key = runtime.cache.put_child(kind, body)
    if old is not None and _status_only(old, body):
        return
    runtime.enqueue(key)


def _watch_child(child: Kind) -> None:
    kopf.on.event(
        child.group,
        child.version,
        child.plural,
        labels={L.MANAGED_BY: L.MANAGED_BY_VALUE},
        id=f"{child.plural}-event",
        registry=REGISTRY,
    )(child_event)


# The account kinds are watched only by an operator that makes them (`run`): without the chart's
# `compressor.rbac.createPerModelDeployment`, the operator has no access to them at all.
for _child in children(accounts=False):
    _watch_child(_child)


@kopf.on.event(
    POD.group, POD.version, POD.plural, labels={L.MODEL_DEPLOYMENT: kopf.PRESENT}, registry=REGISTRY
)
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    runtime = memos.runtime(memo)
    body: dict[str, Any] = dict(event.get("object") or {})
    _listing(runtime, event)
    runtime.heard_pod((body.get("metadata") or {}).get("namespace"))
    if event.get("type") == "DELETED":
        runtime.enqueue(runtime.cache.remove_pod(body))
        return
    key, changed = runtime.cache.put_pod(body)
    if changed:
        runtime.enqueue(key)


@kopf.on.event(NODE.group, NODE.version, NODE.plural, registry=REGISTRY)
async def node_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    runtime = memos.runtime(memo)
    body: dict[str, Any] = dict(event.get("object") or {})
    _listing(runtime, event)
    if event.get("type") == "DELETED":
        changed = runtime.cache.remove_node(str((body.get("metadata") or {}).get("name")))
    else:
        changed = runtime.cache.put_node(body)
    if changed:
        for key in runtime.cache.md_keys():
            runtime.enqueue(key)


def run(config: Config) -> int:
    """Run the operator until interrupted; `--standalone` semantics: no kopf peering objects (replicas
    agree on a leader through a Lease instead, `config.leader_election`)."""
    namespaces = config.namespaces
    if config.settings.create_compressor_rbac:
        for child in CHILDREN:
            if child.kind in ACCOUNT_KINDS and child.kind not in _WATCHED_ACCOUNTS:
                _watch_child(child)
                _WATCHED_ACCOUNTS.add(child.kind)
    asyncio.run(
        kopf.operator(
            registry=REGISTRY,
            memo=kopf.Memo(memos.memo(config)),
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=config.liveness,
        )
    )
    return 0
