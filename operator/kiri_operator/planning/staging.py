"""Staged waves behind `assign_nodes`: translate the operator's assignment input to the wave planner's
terms and its plan back to (revision, variant) slots, status fields and events. Pure.

The wave planner decides node -> revision. Variants are this module's concern: a node moved to the update
revision gets its placed variant; a node going back to the stable revision gets the variant it ran there,
remembered in ``status.rollout.stableVariants`` for the nodes that are off stable (and only those, so the
map stays as small as the wave).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kiri_operator import labels as L
from kiri_operator.planning import waves as W
from kiri_operator.plans import Event, Slot

if TYPE_CHECKING:
    from kiri_operator.api.specs import RolloutSpec
    from kiri_operator.planning.assigning import AssignInput, Assignment

ROLLBACK_ANNOTATION = "kiri.dev/rollback"
STABLE_VARIANTS = "stableVariants"


def policy_of(rollout: RolloutSpec) -> W.RolloutPolicy:
    analysis = None
    if rollout.analysis is not None and rollout.analysis.queries:
        queries = rollout.analysis.queries
        analysis = W.AnalysisPolicy(
            interval_seconds=float(min(q.interval for q in queries)),
            # The first verdict waits until every query could have its minSamples.
            warmup_seconds=float(max(q.min_samples * q.interval for q in queries)),
        )
    bandwidth = rollout.bandwidth
    return W.RolloutPolicy(
        stages=tuple(
            W.Stage(nodes=s.nodes, percent=s.percent, bake_seconds=float(s.bake_seconds), pause=s.pause)
            for s in rollout.stages
        ),
        group_by=rollout.group_by,
        max_unavailable=rollout.max_unavailable,
        offline_nodes=rollout.offline_nodes,
        progress_deadline_seconds=float(rollout.progress_deadline_seconds),
        analysis=analysis,
        max_concurrent_downloads=bandwidth.max_concurrent_downloads if bandwidth else None,
        max_bytes_per_wave=bandwidth.max_bytes_per_wave if bandwidth else None,
        paused=rollout.paused,
    )


def commands_of(annotations: Mapping[str, str]) -> W.Commands:
    return W.Commands(
        promote=annotations.get(L.PROMOTE) or None,
        abort=annotations.get(L.ABORT) or None,
        rollback=annotations.get(ROLLBACK_ANNOTATION) or None,
    )


def state_of(rollout_status: Mapping[str, Any] | None, stable_revision: str | None) -> W.RolloutState:
    """The persisted state; an operator that ran without waves (or a status from before them) starts
    from ``status.currentRevision`` as the stable revision."""
    state = W.state_from_status(rollout_status)
    if not rollout_status and stable_revision:
        state = W.RolloutState(stable_revision=stable_revision, update_revision=stable_revision)
    return state


def stage_label(plan: W.WavePlan) -> str:
    step = plan.step
    if step is None:
        return ""
    stage = step.stage
    size = f"{stage.percent:g}%" if stage.percent is not None else f"{stage.nodes} nodes"
    where = f"{step.group} " if step.group is not None else ""
    return f"{where}{step.index + 1}/{len(plan.steps)} ({size})"


def _iso(value: datetime | None) -> str | None:
    return (
        None if value is None else W.state_to_status(W.RolloutState(step_started_at=value))["stepStartedAt"]
    )


def assign_in_waves(inp: AssignInput, out: Assignment) -> Assignment:
    """Fill ``out`` (whose ``keep_revisions`` the caller set) with the staged plan."""
    raw = dict(inp.rollout_state or {})
    remembered: dict[str, str] = dict(raw.pop(STABLE_VARIANTS, None) or {})
    state = state_of(raw, inp.stable_revision)
    placed = [n for n in inp.nodes if n.name in inp.desired]
    nodes = [W.EdgeNode(n.name, dict(n.labels), n.ready, inp.desired[n.name]) for n in placed]
    observed = W.Observed(
        update_revision=inp.update_revision,
        nodes=nodes,
        assignment={n: s.revision for n, s in inp.current.items() if n in inp.desired},
        pods={
            n: W.NodePod(p.revision, p.ready and p.variant == _variant_on(inp, n, p.revision), p.failed)
            for n, p in inp.pods.items()
        },
        variant_sizes=inp.variant_sizes,
        measurement=inp.measurement,
        commands=commands_of(inp.annotations),
    )
    policy = policy_of(inp.rollout)
    plan = W.plan_waves(policy, observed, state, inp.now)

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
    for name, slot in inp.current.items():
        if name not in inp.desired and name in {n.name for n in inp.nodes}:
            slots[name] = slot
    # Remember the stable variant of every node that is now off stable; forget the others.
    for name, slot in inp.current.items():
        if slot.revision == stable and slots.get(name, slot).revision != stable:
            remembered[name] = slot.variant
    remembered = {n: v for n, v in remembered.items() if n in slots and slots[n].revision != stable}

    out.nodes = slots
    out.keep_revisions = frozenset(
        r for r in (*out.keep_revisions, stable, plan.state.previous_stable_revision) if r
    )
    out.rollout = {
        **W.state_to_status(plan.state),
        **({STABLE_VARIANTS: dict(sorted(remembered.items()))} if remembered else {}),
    }
    out.events.extend(Event(e.type, e.reason, e.message) for e in plan.events)
    out.requeue_after = plan.requeue_after
    out.reason = plan.verdict.reason
    out.message = plan.verdict.message
    out.verdict = {
        "Completed": "Complete",
        "Progressing": "Progressing",
        "Holding": "Holding",
        "Inconclusive": "Holding",
        "Paused": "Paused",
        "RolledBack": "RolledBack",
    }[plan.verdict.kind]  # type: ignore[assignment]
    out.history = [
        {
            "revision": h.revision,
            "outcome": h.outcome,
            "reason": h.reason,
            "time": _iso(h.at),
            "message": h.message,
        }
        for h in plan.state.history
        if h.outcome == "RolledBack" and h not in state.history
    ]
    step = plan.step
    online = {n.name for n in inp.nodes if n.ready}
    out.state = {
        "stageIndex": step.stage_index if step is not None else max(0, len(inp.rollout.stages) - 1),
        "stage": stage_label(plan) or ("100%" if plan.verdict.kind == "Completed" else ""),
        "deferredNodes": sorted(n for n in slots if n not in online),
    }
    if step is not None and plan.state.step_started_at is not None:
        out.state["stageStartedAt"] = _iso(plan.state.step_started_at)
    return out


def _variant_on(inp: AssignInput, node: str, revision: str) -> str | None:
    """The variant a node's pod should run on ``revision``: a pod of another variant is not Ready for it."""
    current = inp.current.get(node)
    if current is not None and current.revision == revision:
        return current.variant
    if revision == inp.update_revision:
        return inp.desired.get(node)
    return None
