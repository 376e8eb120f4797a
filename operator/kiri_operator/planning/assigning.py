"""Node-to-revision assignment: the one place that decides which edge node runs which (revision, variant).

Pure. Everything the decision needs comes in (`AssignInput`), and it goes out explicitly (`Assignment`):
where every node belongs, the rollout status to record, the events, and the verdict. Until the update
revision's variants are verified nothing moves (verdict `Waiting`); after that the wave planner
(`planning.waves`) decides node -> revision, and this module turns its plan into slots.

Variants are this module's concern, not the wave planner's: a node moved to the update revision gets its
placed variant; a node going back to the stable revision gets the variant it ran there, remembered in
``status.rollout.stableVariants`` for the nodes that are off stable (and only those, so the map stays as
small as the wave). A pod of another variant than its node's slot is not Ready for the wave planner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from kiri_operator import labels as L
from kiri_operator.api.specs import RolloutSpec
from kiri_operator.api.statuses import RolloutHistoryEntry, RolloutStatus
from kiri_operator.conditions import Reason
from kiri_operator.observations import Measurement, NodeView
from kiri_operator.planning import waves as W
from kiri_operator.planning.stepping import EdgeNode, policy_of
from kiri_operator.plans import Event, Slot

ROLLBACK_ANNOTATION = "kiri.dev/rollback"


@dataclass(frozen=True)
class NodePod:
    """The edge pod Kiri runs on a node, as observed."""

    revision: str
    variant: str
    ready: bool
    failed: bool = False
    """Crash-looping: the wave rolls back at once instead of waiting for the progress deadline."""
    reason: str = ""
    """Why it is not Ready, when the pod says (`caches.not_ready_reason`)."""
    adapters: str = ""
    """The adapter revision it loads (`kiri.dev/adapters`); "" for none. The revision waves ignore it."""


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
    annotations: Mapping[str, str]
    now: datetime
    rollout_status: RolloutStatus | None = None
    """status.rollout as stored: the wave planner's memory (None when there is none)."""
    variant_sizes: Mapping[str, int] = field(default_factory=dict)
    """Artifact bytes per variant of the update revision, for the bandwidth caps."""
    measurement: Measurement | None = None
    """The analysis measurement taken for this reconcile, when one was due (analyzing.measure_due)."""
    measuring: bool = False
    """A due measurement is being taken off the reconcile worker; its end queues a reconcile."""
    deferred_by_policy: str | None = None
    """Why `spec.rollout.updatePolicy` holds the update revision back (planning.updating): nothing moves."""


@dataclass
class Assignment:
    verdict: W.Verdict
    nodes: dict[str, Slot] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    keep_revisions: frozenset[str] = frozenset()
    """Revisions whose DaemonSets stay even with no node, so moving back needs no rebuild."""
    rollout: RolloutStatus | None = None
    """status.rollout to write."""
    requeue_after: float | None = None
    rolled_back: tuple[RolloutHistoryEntry, ...] = ()
    """Rollbacks decided by this plan (promotions are recorded by the caller, in status.history)."""
    stage_index: int = 0
    """Index into spec.rollout.stages of the step in progress (or the last one)."""
    stage: str = ""
    """The step in words, e.g. ``site-a 2/4 (25%)``; ``100%`` once complete."""
    stage_started_at: datetime | None = None
    deferred: tuple[str, ...] = ()
    """Offline nodes, sorted: their slot is set and they converge when back."""


def commands_of(annotations: Mapping[str, str]) -> W.Commands:
    return W.Commands(
        promote=annotations.get(L.PROMOTE) or None,
        abort=annotations.get(L.ABORT) or None,
        rollback=annotations.get(ROLLBACK_ANNOTATION) or None,
    )


def stage_label(plan: W.WavePlan) -> str:
    step = plan.step
    if step is None:
        return ""
    stage = step.stage
    size = f"{stage.percent:g}%" if stage.percent is not None else f"{stage.nodes} nodes"
    where = f"{step.group} " if step.group is not None else ""
    return f"{where}{step.index + 1}/{len(plan.steps)} ({size})"


def assign_nodes(inp: AssignInput) -> Assignment:
    keep = frozenset(r for r in (inp.stable_revision, inp.update_revision) if r)
    if inp.verified and inp.deferred_by_policy is not None:
        eligible = {n.name for n in inp.nodes}
        return Assignment(
            verdict=W.Verdict("Waiting", Reason.UPDATE_DEFERRED, inp.deferred_by_policy),
            nodes={n: s for n, s in inp.current.items() if n in eligible},
            keep_revisions=keep,
            rollout=inp.rollout_status,
        )
    if not inp.verified:
        # Until the variants are verified nothing moves: nodes keep what they run.
        eligible = {n.name for n in inp.nodes}
        message = "waiting for the compression Job to verify the variants"
        return Assignment(
            verdict=W.Verdict("Waiting", Reason.WAITING_FOR_VARIANTS, message),
            nodes={n: s for n, s in inp.current.items() if n in eligible},
            keep_revisions=keep,
            rollout=inp.rollout_status,
        )
    return _assign_in_waves(inp, keep)


def _state_of(stored: RolloutStatus | None, stable_revision: str | None) -> RolloutStatus:
    """The wave planner's state; an operator that ran without waves (or a status from before them) starts
    from ``status.currentRevision`` as the stable revision."""
    if stored is None or not stored.model_fields_set - {"stable_variants"}:
        if stable_revision:
            return RolloutStatus(stable_revision=stable_revision, update_revision=stable_revision)
        return RolloutStatus()
    return stored.model_copy(update={"stable_variants": None})


def _memory_lost(stored: RolloutStatus | None, stable_revision: str | None) -> bool:
    """Neither status.rollout nor status.currentRevision names a stable revision, and no first rollout is
    under way: either this is the first rollout, or the status was lost (a restore without status, a hand
    edit). Only the DaemonSets can tell which."""
    if stable_revision:
        return False
    return stored is None or (stored.stable_revision is None and stored.update_revision is None)


def stable_from_daemonsets(
    current: Mapping[str, Slot], update_revision: str
) -> tuple[str | None, tuple[str, ...]]:
    """The stable revision the DaemonSets show, when the status lost it: the revision (other than the
    update revision) on the most nodes. None and the tied candidates when two or more share the most
    nodes; None and () when only the update revision (or nothing) runs: a first rollout, nothing to protect."""
    counts: dict[str, int] = {}
    for slot in current.values():
        if slot.revision != update_revision:
            counts[slot.revision] = counts.get(slot.revision, 0) + 1
    if not counts:
        return None, ()
    most = max(counts.values())
    top = tuple(sorted(r for r, n in counts.items() if n == most))
    return (top[0], ()) if len(top) == 1 else (None, top)


def _assign_in_waves(inp: AssignInput, keep: frozenset[str]) -> Assignment:
    stored = inp.rollout_status
    remembered: dict[str, str] = dict(stored.stable_variants or {}) if stored is not None else {}
    stable_revision, rebuilt = inp.stable_revision, None
    if _memory_lost(stored, stable_revision):
        # Without this, a lost status looks like a first rollout: every node at once, no stage, no gate.
        stable_revision, tied = stable_from_daemonsets(inp.current, inp.update_revision)
        if tied:
            return _refuse_to_move(inp, keep, tied)
        if stable_revision is not None:
            rebuilt = Event(
                "Warning",
                Reason.STABLE_REVISION_REBUILT,
                f"no stable revision in status; revision {stable_revision} runs on the most nodes "
                "and is taken as stable, so the update goes through every stage and gate",
            )
    state = _state_of(stored if stable_revision == inp.stable_revision else None, stable_revision)
    placed = [n for n in inp.nodes if n.name in inp.desired]
    observed = W.Observed(
        update_revision=inp.update_revision,
        nodes=[EdgeNode(n.name, dict(n.labels), n.ready, inp.desired[n.name]) for n in placed],
        assignment={n: s.revision for n, s in inp.current.items() if n in inp.desired},
        pods={
            n: W.NodePod(
                p.revision, p.ready and p.variant == _variant_on(inp, n, p.revision), p.failed, p.reason
            )
            for n, p in inp.pods.items()
        },
        variant_sizes=inp.variant_sizes,
        measurement=inp.measurement,
        measuring=inp.measuring,
        commands=commands_of(inp.annotations),
    )
    plan = W.plan_waves(policy_of(inp.rollout), observed, state, inp.now)

    stable = plan.state.stable_revision
    slots: dict[str, Slot] = {}
    for name, revision in plan.assignment.items():
        current = inp.current.get(name)
        if revision == inp.update_revision:
            # Within the update revision a node follows its capabilities: a relabelled node changes variant.
            slots[name] = Slot(revision, inp.desired[name])
        elif current is not None and current.revision == revision:
            slots[name] = current
        else:
            slots[name] = Slot(revision, remembered.get(name) or inp.desired[name])
    # Nodes with no accepted variant in the update revision keep what they run.
    eligible = {n.name for n in inp.nodes}
    for name, slot in inp.current.items():
        if name not in inp.desired and name in eligible:
            slots[name] = slot
    # Remember the stable variant of every node that is now off stable; forget the others.
    for name, slot in inp.current.items():
        if slot.revision == stable and slots.get(name, slot).revision != stable:
            remembered[name] = slot.variant
    remembered = {n: v for n, v in remembered.items() if n in slots and slots[n].revision != stable}

    step = plan.step
    online = {n.name for n in inp.nodes if n.ready}
    return Assignment(
        verdict=plan.verdict,
        nodes=slots,
        events=([rebuilt] if rebuilt is not None else []) + list(plan.events),
        keep_revisions=frozenset(r for r in (*keep, stable, plan.state.previous_stable_revision) if r),
        rollout=plan.state.model_copy(update={"stable_variants": dict(sorted(remembered.items())) or None}),
        requeue_after=plan.requeue_after,
        rolled_back=tuple(
            h for h in plan.state.history if h.outcome == "RolledBack" and h not in state.history
        ),
        stage_index=step.stage_index if step is not None else max(0, len(inp.rollout.stages) - 1),
        stage=stage_label(plan) or ("100%" if plan.verdict.kind == "Completed" else ""),
        stage_started_at=plan.state.step_started_at if step is not None else None,
        deferred=tuple(sorted(n for n in slots if n not in online)),
    )


def _refuse_to_move(inp: AssignInput, keep: frozenset[str], tied: tuple[str, ...]) -> Assignment:
    """No stable revision in status, and the DaemonSets do not say which one it was: hold every node where
    it is rather than guess the rollback target or skip the gates. Deleting the DaemonSets of the
    revisions that are not stable (or restoring the status) lets the rollout go on."""
    eligible = {n.name for n in inp.nodes}
    message = (
        f"no stable revision in status and revisions {', '.join(tied)} run on equally many nodes: "
        "not moving any node"
    )
    return Assignment(
        verdict=W.Verdict("Holding", Reason.STABLE_REVISION_UNKNOWN, message),
        nodes={n: s for n, s in inp.current.items() if n in eligible},
        events=[Event("Warning", Reason.STABLE_REVISION_UNKNOWN, message)],
        keep_revisions=keep | frozenset(s.revision for s in inp.current.values()),
        rollout=inp.rollout_status,
    )


def _variant_on(inp: AssignInput, node: str, revision: str) -> str | None:
    """The variant a node's pod should run on ``revision``: a pod of another variant is not Ready for it."""
    current = inp.current.get(node)
    if current is not None and current.revision == revision:
        return current.variant
    if revision == inp.update_revision:
        return inp.desired.get(node)
    return None
