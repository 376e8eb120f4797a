"""Node-to-revision assignment: the one place that decides which edge node runs which (revision, variant).

Everything a rollout strategy could need comes in (`AssignInput`), and the decision goes out explicitly
(`Assignment`): where every node belongs, the rollout state to record in status, the events, and a
verdict. This module moves every eligible node to the update revision at once, as soon as that
revision's variants are verified; staged waves replace `assign_nodes`'s internals, not its signature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from kiri_operator.api.specs import RolloutSpec
from kiri_operator.observations import NodeView
from kiri_operator.planning.staging import assign_in_waves
from kiri_operator.planning.waves import Measurement
from kiri_operator.plans import Event, Slot

# Staged waves (spec.rollout); the all-at-once path below is what they replaced, kept as the reference.
STAGED = True

# Holding, Paused and RolledBack come from staged waves (planning.staging).
Verdict = Literal["Waiting", "Progressing", "Complete", "Holding", "Paused", "RolledBack"]


@dataclass(frozen=True)
class NodePod:
    """The edge pod Kiri runs on a node, as observed."""

    revision: str
    variant: str
    ready: bool
    failed: bool = False
    """Crash-looping: the wave rolls back at once instead of waiting for the progress deadline."""


@dataclass(frozen=True)
class AssignInput:
    rollout: RolloutSpec
    nodes: Sequence[NodeView]
    """Eligible edge nodes (spec.edge.nodeSelector), Ready or not."""
    desired: Mapping[str, str]
    """node -> variant in the update revision, over accepted variants only."""
    update_revision: str
    stable_revision: str | None
    """The last revision that reached every node (status.currentRevision)."""
    verified: bool
    """The update revision's variants are verified: its manifest has been read."""
    current: Mapping[str, Slot]
    """Where nodes are now, read from the existing DaemonSets' node affinity."""
    pods: Mapping[str, NodePod]
    edge_status: Mapping[str, Any]
    annotations: Mapping[str, str]
    now: datetime
    rollout_state: Mapping[str, Any] = field(default_factory=dict)
    """status.rollout: the wave planner's memory."""
    variant_sizes: Mapping[str, int] = field(default_factory=dict)
    """Artifact bytes per variant of the update revision, for the bandwidth caps."""
    measurement: Measurement | None = None
    """The analysis measurement taken for this reconcile, when one was due (analyzing.measure_due)."""


@dataclass
class Assignment:
    nodes: dict[str, Slot] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    """Rollout fields for status.edge (stage, stageIndex, stageStartedAt, ...)."""
    events: list[Event] = field(default_factory=list)
    verdict: Verdict = "Waiting"
    message: str = ""
    keep_revisions: frozenset[str] = frozenset()
    """Revisions whose DaemonSets stay even with no node, so moving back needs no rebuild."""
    rollout: dict[str, Any] = field(default_factory=dict)
    """status.rollout to write."""
    reason: str = ""
    requeue_after: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    """New status.history entries (rollbacks; promotions are recorded by the caller)."""


def assign_nodes(inp: AssignInput) -> Assignment:
    eligible = {n.name for n in inp.nodes}
    out = Assignment(keep_revisions=frozenset(r for r in (inp.stable_revision, inp.update_revision) if r))
    if not inp.verified:
        # Until the variants are verified nothing moves: nodes keep what they run.
        out.nodes = {n: s for n, s in inp.current.items() if n in eligible}
        out.verdict = "Waiting"
        out.message = "waiting for the compression Job to verify the variants"
        out.rollout = dict(inp.rollout_state)
        return out
    if STAGED:
        return assign_in_waves(inp, out)

    moved = 0
    for node in sorted(eligible):
        variant = inp.desired.get(node)
        if variant is None:
            # No accepted variant for this node in the update revision: it keeps its old one, if any.
            if node in inp.current:
                out.nodes[node] = inp.current[node]
            continue
        slot = Slot(inp.update_revision, variant)
        if inp.current.get(node) != slot:
            moved += 1
        out.nodes[node] = slot
    if moved:
        out.events.append(
            Event("Normal", "NodesMoved", f"moved {moved} edge node(s) to revision {inp.update_revision}")
        )
    online = {n.name for n in inp.nodes if n.ready}
    # Offline nodes are deferred, not waited for: their DaemonSet slot is set and they converge when back.
    target = [n for n in out.nodes if out.nodes[n].revision == inp.update_revision and n in online]
    ready = [n for n in target if _ready_on(inp.pods.get(n), out.nodes[n])]
    total = len(target)
    out.state = {
        "stageIndex": len(inp.rollout.stages) - 1 if inp.rollout.stages else 0,
        "stage": "100%",
        "deferredNodes": sorted(n for n in out.nodes if n not in online),
    }
    if len(ready) == total:
        out.verdict = "Complete"
        out.message = f"{total} edge node(s) run revision {inp.update_revision}"
    else:
        out.verdict = "Progressing"
        out.message = f"{len(ready)}/{total} edge node(s) ready on revision {inp.update_revision}"
    return out


def _ready_on(pod: NodePod | None, slot: Slot) -> bool:
    return pod is not None and pod.ready and pod.revision == slot.revision and pod.variant == slot.variant
