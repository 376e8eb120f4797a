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
CHILD_KINDS = (
    "Deployment",
    "Service",
    "Job",
    "DaemonSet",
    "ConfigMap",
    "ServiceAccount",
    "Role",
    "RoleBinding",
)


def _rv(body: Mapping[str, Any]) -> int | None:
    value = (body.get("metadata") or {}).get("resourceVersion")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _newer(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    if old is None:
        return True
    a, b = _rv(new), _rv(old)
    return a is None or b is None or a >= b


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(body))
    (out.get("metadata") or {}).pop("managedFields", None)
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
    )


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
            self.pods.pop(key, None)

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
        with self._lock:
            pods = self.pods.setdefault(key, {})
            changed = pods.get(view.name) != view
            pods[view.name] = view
        return key, changed

    def replace_pods(self, namespace: str | None, bodies: Iterable[Mapping[str, Any]]) -> set[Key]:
        """Swap in a fresh LIST of the pods in ``namespace`` (all when None); the keys whose pods changed.

        The resync's safety net: readiness arrives only through pod events, so a pod watch that went quiet
        would otherwise hold a wave forever on a stale cache.
        """
        fresh: dict[Key, dict[str, PodView]] = {}
        for body in bodies:
            key = owner_key(body)
            if key is not None:
                view = pod_view(body)
                fresh.setdefault(key, {})[view.name] = view
        with self._lock:
            scope = {k for k in self.pods if namespace is None or k[0] == namespace} | set(fresh)
            changed = {k for k in scope if self.pods.get(k, {}) != fresh.get(k, {})}
            for key in scope:
                if key in fresh:
                    self.pods[key] = fresh[key]
                else:
                    self.pods.pop(key, None)
        return changed

    def remove_pod(self, body: Mapping[str, Any]) -> Key | None:
        key = owner_key(body)
        if key is None:
            return None
        name = str((body.get("metadata") or {}).get("name"))
        with self._lock:
            self.pods.get(key, {}).pop(name, None)
        return key

    # -- one consistent view -------------------------------------------------------------------------------
    def observe(self, key: Key, now: datetime, pvcs: frozenset[str] | None) -> Observed | None:
        with self._lock:
            md = self.mds.get(key)
            if md is None:
                return None
            meta = md.get("metadata") or {}
            children = {
                ck: ObjectView(ck[0], ck[1], copy.deepcopy(body))
                for ck, body in self.children.get(key, {}).items()
            }
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
