"""Informer-style caches fed by watch events, so a reconcile reads memory instead of listing the world.

kopf's watch streams deliver every change of ModelDeployments, Kiri's children, their pods and Nodes;
the handlers put them here, `kube` puts the objects it writes here too (so the next reconcile does not
act on its own stale view), and `observe()` cuts one consistent `Observed` for the planner. A
resourceVersion guard keeps a late event from replacing a newer object.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kiri_operator import labels as L
from kiri_operator.observations import NodeView, ObjectView, Observed, PodView, Taint

Key = tuple[str, str]  # (namespace, modeldeployment name)


def _rv(body: Mapping[str, Any]) -> int | None:
    value = (body.get("metadata") or {}).get("resourceVersion")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _newer(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    if old is None:
        return True
    a, b = _rv(new), _rv(old)
    return a is None or b is None or a >= b


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body without managedFields (most of its size), sharing the rest: the bodies come from watch
    events and API responses that nothing else keeps or changes, and the cache hands out deep copies."""
    out = dict(body)
    meta = out.get("metadata")
    if isinstance(meta, Mapping) and "managedFields" in meta:
        out["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return out


def node_view(body: Mapping[str, Any]) -> NodeView:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    taints = tuple(
        Taint(str(t.get("key", "")), str(t.get("value", "") or ""), str(t.get("effect", "")))
        for t in spec.get("taints") or []
    )
    return NodeView(
        name=str(meta.get("name", "")),
        labels=dict(meta.get("labels") or {}),
        ready=ready,
        unschedulable=bool(spec.get("unschedulable")),
        allocatable=dict(status.get("allocatable") or {}),
        taints=taints,
    )


def pod_view(body: Mapping[str, Any]) -> PodView:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return PodView(
        name=str(meta.get("name", "")),
        node=(body.get("spec") or {}).get("nodeName"),
        ready=ready,
        phase=str(status.get("phase", "")),
        labels=dict(meta.get("labels") or {}),
        restarts=restarts,
        reason="" if ready else not_ready_reason(status),
    )


def not_ready_reason(status: Mapping[str, Any]) -> str:
    """What the pod object says about why a container is not ready: a waiting state's reason and message
    (ImagePullBackOff, CrashLoopBackOff, CreateContainerConfigError), else the last termination message
    (what `kiri serve` or the init container printed as it exited). The reason of a live, unready
    `kiri serve` (its readiness body) is not here: the kubelet's httpGet prober keeps only the status code."""
    statuses = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    for c in statuses:
        waiting = (c.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting.get("reason") not in ("PodInitializing", "ContainerCreating"):
            last = ((c.get("lastState") or {}).get("terminated") or {}).get("message") or ""
            # A crash loop's own message is only the back-off; what the container said as it died is the why.
            detail = str(last or waiting.get("message") or "").strip()
            return f"{c.get('name')}: {waiting['reason']}" + (f": {detail}" if detail else "")
    for c in statuses:
        terminated = (c.get("lastState") or {}).get("terminated") or {}
        if terminated.get("message"):
            return f"{c.get('name')}: {str(terminated['message']).strip()}"
    return ""


PodIndex = dict[Key, dict[str, tuple[PodView, int | None]]]


def index_pods(bodies: Iterable[Mapping[str, Any]], into: PodIndex | None = None) -> PodIndex:
    """Pods of a LIST (page by page) as slim views with their resourceVersions, by ModelDeployment."""
    out: PodIndex = {} if into is None else into
    for body in bodies:
        key = owner_key(body)
        if key is not None:
            view = pod_view(body)
            out.setdefault(key, {})[view.name] = (view, _rv(body))
    return out


def owner_key(body: Mapping[str, Any]) -> Key | None:
    meta = body.get("metadata") or {}
    md = (meta.get("labels") or {}).get(L.MODEL_DEPLOYMENT)
    ns = meta.get("namespace")
    return (str(ns), str(md)) if md and ns else None


@dataclass
class Cache:
    mds: dict[Key, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, NodeView] = field(default_factory=dict)
    children: dict[Key, dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)
    pods: dict[Key, dict[str, PodView]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # (namespace, pod) -> resourceVersion of the cached pod, and of a pod's deletion: a resync LIST is a
    # snapshot, and watch events newer than it must survive it.
    _pod_versions: dict[tuple[str, str], int] = field(default_factory=dict)
    _pod_deleted: dict[tuple[str, str], int] = field(default_factory=dict)

    # -- ModelDeployments ---------------------------------------------------------------------------
    def put_md(self, body: Mapping[str, Any]) -> Key:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        with self._lock:
            if _newer(body, self.mds.get(key)):
                self.mds[key] = _slim(body)
        return key

    def remove_md(self, key: Key) -> None:
        with self._lock:
            self.mds.pop(key, None)
            self.children.pop(key, None)
            for name in self.pods.pop(key, {}):
                self._pod_versions.pop((key[0], name), None)

    def md(self, key: Key) -> dict[str, Any] | None:
        with self._lock:
            body = self.mds.get(key)
            return copy.deepcopy(body) if body is not None else None

    def md_keys(self) -> list[Key]:
        with self._lock:
            return sorted(self.mds)

    # -- Nodes ---------------------------------------------------------------------------------------
    def put_node(self, body: Mapping[str, Any]) -> bool:
        """Store a node; True when what the planner looks at (labels, readiness, capacity) changed."""
        view = node_view(body)
        with self._lock:
            changed = self.nodes.get(view.name) != view
            self.nodes[view.name] = view
        return changed

    def remove_node(self, name: str) -> bool:
        with self._lock:
            return self.nodes.pop(name, None) is not None

    # -- children and pods ------------------------------------------------------------------------------
    def put_child(self, kind: str, body: Mapping[str, Any]) -> Key | None:
        key = owner_key(body)
        if key is None:
            return None
        name = str((body.get("metadata") or {}).get("name"))
        with self._lock:
            objs = self.children.setdefault(key, {})
            if _newer(body, objs.get((kind, name))):
                objs[(kind, name)] = _slim(body)
        return key

    def child(self, key: Key, kind: str, name: str) -> dict[str, Any] | None:
        """The cached body (shared, not a copy: read it, do not change it)."""
        with self._lock:
            return self.children.get(key, {}).get((kind, name))

    def remove_child(self, kind: str, body: Mapping[str, Any]) -> Key | None:
        key = owner_key(body)
        if key is None:
            return None
        name = str((body.get("metadata") or {}).get("name"))
        with self._lock:
            self.children.get(key, {}).pop((kind, name), None)
        return key

    def put_pod(self, body: Mapping[str, Any]) -> tuple[Key | None, bool]:
        key = owner_key(body)
        if key is None:
            return None, False
        view = pod_view(body)
        rv = _rv(body)
        with self._lock:
            known = self._pod_versions.get((key[0], view.name))
            if rv is not None and known is not None and rv < known:
                return key, False  # older than what the cache holds (a late event)
            pods = self.pods.setdefault(key, {})
            changed = pods.get(view.name) != view
            pods[view.name] = view
            self._remember(key[0], view.name, rv)
        return key, changed

    def _remember(self, namespace: str, name: str, rv: int | None) -> None:
        if rv is None:
            self._pod_versions.pop((namespace, name), None)
        else:
            self._pod_versions[(namespace, name)] = rv

    def replace_pods(self, namespace: str | None, fresh: PodIndex, list_version: int | None) -> set[Key]:
        """Merge a resync LIST of the pods in ``namespace`` (all when None), taken at ``list_version``;
        return the keys whose pods changed.

        The resync's safety net: readiness arrives only through pod events, so a pod watch that went quiet
        would otherwise hold a wave forever on a stale cache. The LIST is a snapshot, and watch events may
        have arrived after it: a cached pod newer than its LIST copy stays, a pod the cache got after the
        snapshot stays, and a pod deleted after the snapshot does not come back.
        """
        with self._lock:
            scope = {k for k in self.pods if namespace is None or k[0] == namespace} | set(fresh)
            changed: set[Key] = set()
            for key in scope:
                ns = key[0]
                cached = self.pods.get(key, {})
                merged: dict[str, PodView] = {}
                for name, (view, rv) in fresh.get(key, {}).items():
                    deleted = self._pod_deleted.get((ns, name))
                    if deleted is not None and (rv is None or deleted >= rv):
                        continue
                    known = self._pod_versions.get((ns, name))
                    if name in cached and known is not None and rv is not None and known > rv:
                        merged[name] = cached[name]
                    else:
                        merged[name] = view
                        self._remember(ns, name, rv)
                for name, view in cached.items():
                    if name in merged:
                        continue
                    known = self._pod_versions.get((ns, name))
                    if list_version is not None and known is not None and known > list_version:
                        merged[name] = view  # created after the snapshot
                    else:
                        self._pod_versions.pop((ns, name), None)
                if merged != cached:
                    changed.add(key)
                if merged:
                    self.pods[key] = merged
                else:
                    self.pods.pop(key, None)
            if list_version is not None:
                # Deletions the snapshot already shows cannot be undone by it or by a later one.
                self._pod_deleted = {
                    k: v
                    for k, v in self._pod_deleted.items()
                    if v > list_version or (namespace is not None and k[0] != namespace)
                }
        return changed

    def tombstones(self) -> dict[tuple[str, str], int]:
        """(namespace, pod) -> resourceVersion of the pod deletions a resync LIST must not undo."""
        with self._lock:
            return dict(self._pod_deleted)

    def remove_pod(self, body: Mapping[str, Any]) -> Key | None:
        key = owner_key(body)
        if key is None:
            return None
        name = str((body.get("metadata") or {}).get("name"))
        with self._lock:
            self.pods.get(key, {}).pop(name, None)
            self._pod_versions.pop((key[0], name), None)
            rv = _rv(body)
            if rv is not None:
                self._pod_deleted[(key[0], name)] = rv
        return key

    # -- one consistent view -------------------------------------------------------------------------------
    def observe(self, key: Key, now: datetime, pvcs: frozenset[str] | None) -> Observed | None:
        with self._lock:
            md = self.mds.get(key)
            if md is None:
                return None
            meta = md.get("metadata") or {}
            # No copies: the cache replaces a child's body on every change and never edits one, and the
            # planner reads them as Mappings (these deep copies were 7% of the operator's CPU).
            children = {ck: ObjectView(ck[0], ck[1], body) for ck, body in self.children.get(key, {}).items()}
            return Observed(
                name=key[1],
                namespace=key[0],
                uid=str(meta.get("uid", "")),
                generation=int(meta.get("generation") or 0),
                now=now,
                status=copy.deepcopy(md.get("status") or {}),
                annotations=dict(meta.get("annotations") or {}),
                nodes=tuple(sorted(self.nodes.values(), key=lambda n: n.name)),
                children=children,
                pods=tuple(self.pods.get(key, {}).values()),
                pvcs=pvcs,
            )
