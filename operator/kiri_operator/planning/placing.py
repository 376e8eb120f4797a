"""Variant placement: each edge node gets the first variant, in spec order, whose `requires` it meets."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from kiri_operator import labels as L
from kiri_operator.api.specs import NodeRequirements, SelectorRequirement, Toleration, Variant
from kiri_operator.observations import NodeView, Taint

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTPE]i?|[mk]|)$")
_FACTORS = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
}


def parse_quantity(value: str) -> float | None:
    match = _QUANTITY.match(value.strip())
    if not match:
        return None
    return float(match.group(1)) * _FACTORS[match.group(2)]


def node_memory_mb(node: NodeView) -> float | None:
    """Allocatable memory in MiB; the `kiri.dev/memory-mb` label when the node does not report it."""
    raw = node.allocatable.get("memory")
    if raw is not None:
        parsed = parse_quantity(raw)
        if parsed is not None:
            return parsed / 1024**2
    label = node.labels.get(L.MEMORY_MB)
    if label is not None and label.isdigit():
        return float(label)
    return None


def _expression_matches(expr: SelectorRequirement, node_labels: Mapping[str, str]) -> bool:
    value = node_labels.get(expr.key)
    if expr.operator == "In":
        return value is not None and value in expr.values
    if expr.operator == "NotIn":
        return value is None or value not in expr.values
    if expr.operator == "Exists":
        return value is not None
    if expr.operator == "DoesNotExist":
        return value is None
    # Gt / Lt compare integers, as the Kubernetes node affinity does.
    try:
        have, want = int(value or ""), int(expr.values[0])
    except ValueError:
        return False
    return have > want if expr.operator == "Gt" else have < want


def requirements_met(requires: NodeRequirements, node: NodeView) -> bool:
    if any(node.labels.get(k) != v for k, v in requires.match_labels.items()):
        return False
    if not all(_expression_matches(e, node.labels) for e in requires.match_expressions):
        return False
    if requires.min_memory_mb is not None:
        memory = node_memory_mb(node)
        if memory is None or memory < requires.min_memory_mb:
            return False
    return True


def selects(selector: Mapping[str, str], node: NodeView) -> bool:
    # A set comparison of the items views runs in C: every reconcile calls this once per node in the cluster.
    return selector.items() <= node.labels.items()


DAEMON_TOLERATED = "node.kubernetes.io/"
"""The node conditions' taints (not-ready, unreachable, the pressures, unschedulable): the DaemonSet
controller adds tolerations of them to every pod it makes, so they never keep an edge pod off its node."""


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    """Kubernetes' rule: same key, same effect (or none given), same value unless the operator is Exists."""
    if toleration.key != taint.key:
        return False
    if toleration.effect and toleration.effect != taint.effect:
        return False
    return toleration.operator == "Exists" or (toleration.value or "") == taint.value


def admits(tolerations: Sequence[Toleration], node: NodeView) -> bool:
    """Whether a DaemonSet pod with `tolerations` can run on `node`: every taint that keeps pods off it
    (NoSchedule, NoExecute) is tolerated. A node it cannot run on is not a rollout target: a wave that
    waited for it would wait forever."""
    return all(
        t.effect not in ("NoSchedule", "NoExecute")
        or t.key.startswith(DAEMON_TOLERATED)
        or any(tolerates(tol, t) for tol in tolerations)
        for t in node.taints
    )


@dataclass(frozen=True)
class Placement:
    variants: dict[str, str] = field(default_factory=dict)
    """node -> variant it should run."""
    unmatched: tuple[str, ...] = ()
    """Nodes no variant's `requires` matches."""
    rejected_only: tuple[str, ...] = ()
    """Nodes that match only variants the compressor rejected."""


def place(
    variants: Sequence[Variant], nodes: Sequence[NodeView], accepted: Collection[str] | None = None
) -> Placement:
    """Place each node on its first matching variant; `accepted` (when known) leaves rejected ones out.

    A node whose first match was rejected falls through to the next matching accepted variant: a rejected
    variant is never rolled out, but the node can still serve a weaker one it is able to run.
    """
    chosen: dict[str, str] = {}
    unmatched: list[str] = []
    rejected_only: list[str] = []
    for node in sorted(nodes, key=lambda n: n.name):
        matching = [v.name for v in variants if requirements_met(v.requires, node)]
        if not matching:
            unmatched.append(node.name)
            continue
        allowed = [v for v in matching if accepted is None or v in accepted]
        if allowed:
            chosen[node.name] = allowed[0]
        else:
            rejected_only.append(node.name)
    return Placement(chosen, tuple(unmatched), tuple(rejected_only))
