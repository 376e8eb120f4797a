"""Operator metrics (Prometheus): reconcile duration, API requests by verb and resource, nodes per phase.

One registry per process, served by `serve(port)`; tests read the same counters to count writes.
"""

from __future__ import annotations

import threading
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY: Final = CollectorRegistry()
WRITE_VERBS: Final = frozenset({"create", "update", "patch", "apply", "delete"})

RECONCILE_SECONDS: Final = Histogram(
    "kiri_reconcile_duration_seconds",
    "Time for one reconcile of one ModelDeployment (observe, plan, apply).",
    ["result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
API_REQUESTS: Final = Counter(
    "kiri_api_requests",
    "Kubernetes API requests made by the operator (watches excluded), by verb, resource and status code.",
    ["verb", "resource", "code"],
    registry=REGISTRY,
)
NODES: Final = Gauge(
    "kiri_edge_nodes",
    "Edge nodes per ModelDeployment, variant and phase (ready, updating, deferred, unmatched).",
    ["namespace", "modeldeployment", "variant", "phase"],
    registry=REGISTRY,
)
RECONCILE_WRITES: Final = Counter(
    "kiri_reconcile_writes",
    "Writes decided by reconciles, by kind of object and check result (Create, Update, Delete, Status, Event).",
    ["kind", "check"],
    registry=REGISTRY,
)
EVENT_TO_STATUS_SECONDS: Final = Histogram(
    "kiri_event_to_status_seconds",
    "From the first watch event that queued a ModelDeployment to the status patch of the reconcile it caused.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
    registry=REGISTRY,
)
LEADER: Final = Gauge(
    "kiri_leader",
    "1 while this replica reconciles (it holds the leader Lease, or runs without leader election), 0 while it "
    "stands by.",
    registry=REGISTRY,
)
LEADER_TRANSITIONS: Final = Counter(
    "kiri_leader_transitions",
    "Times this replica became (to=leader) or stopped being (to=standby) the leader.",
    ["to"],
    registry=REGISTRY,
)
QUEUE_DEPTH: Final = Gauge(
    "kiri_workqueue_depth", "ModelDeployments waiting for a reconcile.", registry=REGISTRY
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr, registry=REGISTRY)


# The (variant, phase) label sets each ModelDeployment has in NODES: collecting the gauge to find them cost
# 8% of the operator's CPU at 50 ModelDeployments, since every reconcile sets its counts.
_NODE_LABELS: dict[tuple[str, str], set[tuple[str, str]]] = {}
_NODE_LABELS_LOCK = threading.Lock()


def set_nodes(namespace: str, name: str, counts: dict[tuple[str, str], int]) -> None:
    """Replace the node gauges of one ModelDeployment (stale label sets are removed, not left at old values)."""
    with _NODE_LABELS_LOCK:
        known = _NODE_LABELS.pop((namespace, name), set())
        for key in known - counts.keys():
            NODES.remove(namespace, name, *key)
        for (variant, phase), n in counts.items():
            NODES.labels(namespace, name, variant, phase).set(n)
        if counts:
            _NODE_LABELS[(namespace, name)] = set(counts)
